//! Everything that speaks to Redis.
//!
//! - [`client`]: the synchronous store behind `flumeq.Client` (no threads, so a
//!   process that enqueues may still fork its actors safely);
//! - [`reader`]: the dispatcher's read commands, the hot path, on zero-copy
//!   connections (`connection::RawConnection`);
//! - [`writer`]: the dispatcher's write commands, on its reconnecting
//!   connection: groups, acks, dead letters, counters;
//! - [`reply`]: turning stream replies into entries.

pub mod client;
pub mod reader;
pub mod reply;
pub mod writer;

use crate::envelope::RawEntry;

/// A queue as the dispatcher serves it.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Share of each read when several queues have work.
    pub weight: u32,
    /// Its stream key.
    pub stream: String,
}

/// A task to move to the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The entry as read.
    pub entry: RawEntry,
    /// Short cause: `error`, `unknown_type`, `invalid`, `rejected`, ...
    pub reason: &'static str,
    /// Error text.
    pub error: Vec<u8>,
    /// Formatted traceback (may be empty).
    pub traceback: Vec<u8>,
    /// Runs made, including the last one.
    pub attempts: u32,
}

/// The kept outcome of a task that ended (it was enqueued with a
/// `result_ttl`): written as the task's result hash, and announced on the
/// queue's `ended` stream, in the ack's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The task id.
    pub id: bytes::Bytes,
    /// How long the record lives, ms.
    pub ttl_ms: u64,
    /// `succeeded`, `dead` or `cancelled`.
    pub state: &'static str,
    /// The return value as JSON (`succeeded`).
    pub value: Vec<u8>,
    /// Why it died (`dead`): the dead-letter reason.
    pub reason: &'static str,
    /// The last failure's text (`dead`).
    pub error: Vec<u8>,
    /// The last failure's traceback (`dead`).
    pub traceback: Vec<u8>,
    /// Runs made.
    pub attempts: u32,
}

/// What one queue's finished tasks need written back. Everything here is
/// written in one MULTI/EXEC per queue, so a task is never both acked and
/// missing from where it went next.
#[derive(Debug, Default, Clone)]
pub struct QueueOutcomes {
    /// Entries to acknowledge and delete (done, dead-lettered, retried, requeued).
    pub finished: Vec<bytes::Bytes>,
    /// Entries to copy to the dead-letter stream first.
    pub dead: Vec<DeadLetter>,
    /// Next runs to schedule: (due time in ms, task as a delayed member).
    pub delayed: Vec<(u64, String)>,
    /// Tasks to append to the stream again (retry now, or handed back
    /// unstarted at a graceful stop): their fields.
    pub append: Vec<Vec<(bytes::Bytes, bytes::Bytes)>>,
    /// Done markers to set (task ids of idempotent tasks that succeeded).
    pub done_ids: Vec<bytes::Bytes>,
    /// Unique-key locks to release: (lock key, owning task id).
    pub unlock: Vec<(String, bytes::Bytes)>,
    /// Our own pending entries to keep fresh (so nobody claims them).
    pub refresh: Vec<bytes::Bytes>,
    /// Outcomes to keep, of tasks enqueued with a `result_ttl`.
    pub ended: Vec<Ended>,
    /// Successful runs.
    pub processed: u64,
    /// Failed runs.
    pub failed: u64,
    /// Failed runs that will run again.
    pub retried: u64,
    /// Deliveries skipped because the task id was already done.
    pub skipped: u64,
    /// Tasks moved to the dead letters.
    pub dead_count: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks held back by a global limit.
    pub throttled: u64,
    /// The same counters per task type.
    pub by_type: Vec<(bytes::Bytes, TypeCounts)>,
    /// Handler run times reported by actors, per task type.
    pub durations: Vec<Durations>,
    /// Task-history events (engines running with `history`).
    pub events: crate::history::Events,
    /// Summaries of completed tasks enqueued with a `retention`.
    pub completed: Vec<Completed>,
}

/// The summary of a completed task kept for its `retention` (type,
/// payload, result or error, times, engine), as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The task id.
    pub id: bytes::Bytes,
    /// When the summary expires, ms since the epoch.
    pub expires_ms: u64,
    /// The summary (a JSON object).
    pub summary: Vec<u8>,
}

/// Counters of one task type.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TypeCounts {
    /// Successful runs.
    pub processed: u64,
    /// Failed runs.
    pub failed: u64,
    /// Failed runs that will run again.
    pub retried: u64,
    /// Tasks dead-lettered.
    pub dead: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks held back by a global limit.
    pub throttled: u64,
}

/// A histogram of handler run times of one task type, as an actor sent it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Durations {
    /// Task type.
    pub kind: String,
    /// Total seconds.
    pub sum: f64,
    /// `(bucket index, runs)`, buckets as the Python side defines them.
    pub buckets: Vec<(u32, u64)>,
}

impl QueueOutcomes {
    /// Whether there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.needs_block() && self.unlock.is_empty() && self.refresh.is_empty()
    }

    /// Whether anything must go into the queue's transaction (everything but
    /// the refreshes and unique-key releases, which are safe to repeat).
    #[must_use]
    pub fn needs_block(&self) -> bool {
        !(self.finished.is_empty()
            && self.dead.is_empty()
            && self.delayed.is_empty()
            && self.append.is_empty()
            && self.done_ids.is_empty()
            && self.ended.is_empty()
            && self.processed == 0
            && self.failed == 0
            && self.skipped == 0
            && self.dead_count == 0
            && self.cancelled == 0
            && self.throttled == 0
            && self.durations.is_empty()
            && self.events.is_empty()
            && self.completed.is_empty())
    }

    /// Tasks whose outcome this holds (each finished entry is one task).
    #[must_use]
    pub fn tasks(&self) -> usize {
        self.finished.len()
    }

    /// The counters of task type `kind`, made on first use. Entries without
    /// a type (not tasks) count as `?`.
    pub fn type_counts(&mut self, kind: &[u8]) -> &mut TypeCounts {
        let kind = if kind.is_empty() { b"?" } else { kind };
        let at = if let Some(at) = self.by_type.iter().position(|(name, _)| name == kind) {
            at
        } else {
            self.by_type
                .push((bytes::Bytes::copy_from_slice(kind), TypeCounts::default()));
            self.by_type.len() - 1
        };
        &mut self.by_type[at].1
    }

    /// Adds `other` to `self`.
    pub fn merge(&mut self, other: Self) {
        self.finished.extend(other.finished);
        self.dead.extend(other.dead);
        self.delayed.extend(other.delayed);
        self.append.extend(other.append);
        self.done_ids.extend(other.done_ids);
        self.unlock.extend(other.unlock);
        self.refresh.extend(other.refresh);
        self.ended.extend(other.ended);
        self.events.merge(other.events);
        self.completed.extend(other.completed);
        self.processed += other.processed;
        self.failed += other.failed;
        self.retried += other.retried;
        self.skipped += other.skipped;
        self.dead_count += other.dead_count;
        self.cancelled += other.cancelled;
        self.throttled += other.throttled;
        for (kind, counts) in other.by_type {
            let into = self.type_counts(&kind);
            into.processed += counts.processed;
            into.failed += counts.failed;
            into.retried += counts.retried;
            into.dead += counts.dead;
            into.cancelled += counts.cancelled;
            into.throttled += counts.throttled;
        }
        for durations in other.durations {
            self.add_durations(durations);
        }
    }

    /// Adds a histogram of run times, merged with the one of its type.
    pub fn add_durations(&mut self, durations: Durations) {
        let Some(into) = self
            .durations
            .iter_mut()
            .find(|known| known.kind == durations.kind)
        else {
            self.durations.push(durations);
            return;
        };
        into.sum += durations.sum;
        for (bucket, count) in durations.buckets {
            match into.buckets.iter_mut().find(|(known, _)| *known == bucket) {
                Some((_, total)) => *total += count,
                None => into.buckets.push((bucket, count)),
            }
        }
    }
}
