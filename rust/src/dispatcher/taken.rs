//! A task the dispatcher took from Redis: pending in our consumer until its
//! outcome is written.

use std::time::Instant;

use crate::envelope::{self, RawEntry};

/// What finishing a task must also do, learnt when it was parsed for its
/// actor (so finishing it needs no second look at the fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    /// It holds a unique-key lock to release.
    pub unique: bool,
    /// Its id is the caller's: write a done marker on success.
    pub idempotent: bool,
    /// Index of its `type` field, for counting by type without a search.
    pub kind_at: usize,
    /// How long its outcome is kept, ms (0 = not kept).
    pub result_ttl_ms: u64,
    /// How long a summary of it is kept once it ended, ms (0 = not kept).
    pub retention_ms: u64,
    /// Its failed runs so far (its `attempt` field).
    pub attempt: u32,
    /// Whether the fields above were learnt (the task went to an actor).
    pub parsed: bool,
}

/// A task taken from Redis.
#[derive(Debug)]
pub struct Taken {
    /// Index of its queue.
    pub queue: u16,
    /// The entry as read.
    pub entry: RawEntry,
    /// When we took it (to keep long-held entries fresh).
    pub since: Instant,
    /// Learnt when handed to an actor.
    pub flags: Flags,
    /// When it was handed to an actor (ms since the epoch; 0 = not yet).
    pub started_ms: u64,
    /// It was in a batch whose actor died with nothing to blame: it runs
    /// alone from now on, so that a death it causes is pinned on it.
    pub suspect: bool,
    /// Which master it was read from: the endpoint's generation of the
    /// connection that delivered it (with Sentinel; always 0 otherwise).
    /// Entry ids are only meaningful on the master that made them: after a
    /// failover, one read from the old master may name another task on the
    /// new one, so its outcome is not written there (see `Book`).
    pub generation: u64,
}

impl Taken {
    /// A task taken at `since` (one clock read serves a whole read's
    /// batch), read from the master of `generation`.
    #[must_use]
    pub fn new(queue: u16, entry: RawEntry, since: Instant, generation: u64) -> Self {
        Self {
            queue,
            entry,
            since,
            flags: Flags::default(),
            started_ms: 0,
            suspect: false,
            generation,
        }
    }

    /// The task type (empty when missing).
    #[must_use]
    pub fn kind(&self) -> &[u8] {
        if self.flags.parsed {
            if let Some((_, kind)) = self.entry.fields.get(self.flags.kind_at) {
                return kind;
            }
        }
        self.entry.get(envelope::field::TYPE).unwrap_or_default()
    }

    /// `(attempt, max_retry)` of the task (`(0, 0)` when unreadable).
    #[must_use]
    pub fn attempts(&self) -> (u32, u32) {
        envelope::parse(&self.entry).map_or((0, 0), |task| (task.attempt, task.max_retry))
    }

    /// "task id (entry id)" for logs.
    #[must_use]
    pub fn label(&self) -> String {
        let id = self
            .entry
            .get(envelope::field::ID)
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .unwrap_or_default();
        format!("{id} (entry {})", self.entry.id_text())
    }
}
