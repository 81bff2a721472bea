//! Every Redis key flumeq uses, built in one place.
//!
//! All keys of a queue carry the hash tag `{queue}`, so one queue lives on one
//! Redis Cluster slot and the Lua scripts touching several of its keys stay
//! legal there. Only the registries (known queues, live engines) and the set
//! of paused queues are global; each is read or written on its own, never in
//! a script or MULTI with a queue's keys. The cron entries' leases share the
//! tag `{cron}`, so one script keeps them all; the global limits share the
//! tag `{limits}`, so one script checks every limit a batch meets.

/// How long a cancel record lasts (ms): a task taken by an engine when it
/// was cancelled ends as cancelled whenever some engine next holds it
/// within this time (after a reconnect, or a dead engine's recovery).
pub const CANCEL_TTL_MS: u64 = 24 * 3600 * 1000;

/// Why a queue name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue name {name:?}: {reason}")]
pub struct QueueNameError {
    /// The refused name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks that `name` can be used inside a hash tag.
pub fn validate_queue(name: &str) -> Result<(), QueueNameError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > 200 {
        "it is longer than 200 bytes"
    } else if name.contains(['{', '}']) {
        "it contains '{' or '}', which would break the Redis Cluster hash tag"
    } else if name.chars().any(char::is_control) {
        "it contains control characters"
    } else {
        return Ok(());
    };
    Err(QueueNameError {
        name: name.to_owned(),
        reason,
    })
}

/// Builds key names under one prefix (`flumeq` by default).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new("flumeq")
    }
}

impl Keys {
    /// Keys under `prefix`.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    fn queue_key(&self, queue: &str, what: &str) -> String {
        format!("{}:{{{queue}}}:{what}", self.prefix)
    }

    /// The stream of ready and in-flight tasks.
    #[must_use]
    pub fn stream(&self, queue: &str) -> String {
        self.queue_key(queue, "stream")
    }

    /// The dead-letter stream.
    #[must_use]
    pub fn dead(&self, queue: &str) -> String {
        self.queue_key(queue, "dead")
    }

    /// The ZSET of scheduled and retrying tasks (score = due time in ms).
    #[must_use]
    pub fn delayed(&self, queue: &str) -> String {
        self.queue_key(queue, "delayed")
    }

    /// The hash of counters (processed, failed, ...).
    #[must_use]
    pub fn stats(&self, queue: &str) -> String {
        self.queue_key(queue, "stats")
    }

    /// The lock a `unique_key` holds while its task lives.
    #[must_use]
    pub fn unique(&self, queue: &str, key: &str) -> String {
        self.queue_key(queue, &format!("unique:{key}"))
    }

    /// The "done" marker of a task id (idempotency, kept `processed_ttl`).
    #[must_use]
    pub fn done(&self, queue: &str, task_id: &str) -> String {
        self.queue_key(queue, &format!("done:{task_id}"))
    }

    /// The kept outcome of task `task_id` (a hash; only for tasks enqueued
    /// with a `result_ttl`, and for that long).
    #[must_use]
    pub fn result(&self, queue: &str, task_id: &str) -> String {
        self.queue_key(queue, &format!("result:{task_id}"))
    }

    /// The stream announcing the ids of tasks whose outcome was kept, which
    /// waiters block on (capped at `ENDED_MAX_LENGTH`).
    #[must_use]
    pub fn ended(&self, queue: &str) -> String {
        self.queue_key(queue, "ended")
    }

    /// The cancel records of tasks that were running or taken by an
    /// engine when they were cancelled: a ZSET of task ids scored by the
    /// time of the cancel (ms), read by every engine from its own cursor and
    /// pruned after `CANCEL_TTL_MS`.
    #[must_use]
    pub fn cancels(&self, queue: &str) -> String {
        self.queue_key(queue, "cancels")
    }

    /// The write marker of one engine (consumer) in a queue: the sequence
    /// number of its last outcome transaction, so a replay after a lost
    /// reply is skipped (see `streams::writer`).
    #[must_use]
    pub fn written(&self, queue: &str, consumer: &str) -> String {
        self.queue_key(queue, &format!("written:{consumer}"))
    }

    /// The stream of task-history events waiting for a history process to
    /// write them into `PostgreSQL` (`crate::history`): one entry per
    /// outcome write, fields `n` (events) and `events` (a JSON array).
    #[must_use]
    pub fn events(&self, queue: &str) -> String {
        self.queue_key(queue, "events")
    }

    /// The summaries of completed tasks enqueued with a `retention` (a hash:
    /// task id -> JSON summary), for task lookups without a history.
    #[must_use]
    pub fn completed(&self, queue: &str) -> String {
        self.queue_key(queue, "completed")
    }

    /// When each summary of `completed` expires: a ZSET of task ids scored
    /// by ms since the epoch, which also bounds how many are kept.
    #[must_use]
    pub fn completed_expiry(&self, queue: &str) -> String {
        self.queue_key(queue, "completed:expiry")
    }

    /// The hash of handler run-time histograms.
    #[must_use]
    pub fn durations(&self, queue: &str) -> String {
        self.queue_key(queue, "durations")
    }

    /// The sorted set of live engines (score: last heartbeat, ms).
    #[must_use]
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// One engine's registry hash.
    #[must_use]
    pub fn worker(&self, consumer: &str) -> String {
        format!("{}:worker:{consumer}", self.prefix)
    }

    /// The set of every queue ever enqueued to or served.
    #[must_use]
    pub fn queues(&self) -> String {
        format!("{}:queues", self.prefix)
    }

    /// The hash of a queue's cron entries and the time (ms) of the last
    /// tick each enqueued: the guard that makes a tick go in once.
    #[must_use]
    pub fn cron_ticks(&self, queue: &str) -> String {
        self.queue_key(queue, "cron")
    }

    /// The cron entries the engines carry (name -> JSON description), for
    /// `flumeq cron`. With the scheduler leases under one hash tag.
    #[must_use]
    pub fn cron_entries(&self) -> String {
        format!("{}:{{cron}}:entries", self.prefix)
    }

    /// The scheduler lease of cron entry `name` (its holder enqueues its ticks).
    #[must_use]
    pub fn cron_lease(&self, name: &str) -> String {
        format!("{}:{{cron}}:lease:{name}", self.prefix)
    }

    /// The rate limit of task type `kind`: its GCRA theoretical arrival time
    /// (ms, a decimal string), expiring once it is past.
    #[must_use]
    pub fn rate(&self, kind: &str) -> String {
        format!("{}:{{limits}}:rate:{kind}", self.prefix)
    }

    /// The concurrency leases of task type `kind`: a ZSET of running tasks
    /// (`<entry id>|<queue>`) scored by when their lease lapses (ms).
    #[must_use]
    pub fn running(&self, kind: &str) -> String {
        format!("{}:{{limits}}:running:{kind}", self.prefix)
    }

    /// The set of paused queues: no engine starts their tasks.
    #[must_use]
    pub fn paused(&self) -> String {
        format!("{}:paused", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_share_one_hash_tag() {
        let keys = Keys::default();
        assert_eq!(keys.stream("mail"), "flumeq:{mail}:stream");
        assert_eq!(keys.dead("mail"), "flumeq:{mail}:dead");
        assert_eq!(keys.delayed("mail"), "flumeq:{mail}:delayed");
        assert_eq!(keys.stats("mail"), "flumeq:{mail}:stats");
        assert_eq!(keys.events("mail"), "flumeq:{mail}:events");
        assert_eq!(keys.completed("mail"), "flumeq:{mail}:completed");
        assert_eq!(Keys::new("app").queues(), "app:queues");
        assert_eq!(Keys::new("app").paused(), "app:paused");
        assert_eq!(keys.unique("mail", "u:1"), "flumeq:{mail}:unique:u:1");
        assert_eq!(keys.done("mail", "order-7"), "flumeq:{mail}:done:order-7");
        assert_eq!(keys.written("mail", "pod-1"), "flumeq:{mail}:written:pod-1");
        assert_eq!(keys.rate("email:send"), "flumeq:{limits}:rate:email:send");
        assert_eq!(keys.running("r"), "flumeq:{limits}:running:r");
    }

    #[test]
    fn queue_names_that_break_hash_tags_are_refused() {
        assert!(validate_queue("default").is_ok());
        assert!(validate_queue("emails.high-priority").is_ok());
        let error = validate_queue("a}b").err().map(|error| error.to_string());
        assert_eq!(
            error.as_deref(),
            Some("invalid queue name \"a}b\": it contains '{' or '}', which would break the Redis Cluster hash tag")
        );
        assert!(validate_queue("").is_err());
        assert!(validate_queue("tab\there").is_err());
    }
}
