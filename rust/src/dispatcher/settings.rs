//! What a dispatcher runs with: one struct, filled by the engine (from a
//! Python dict in the binding), and the defaults the engine offers.

/// Defaults of the engine's settings, exported to Python as constants.
pub mod defaults {
    /// Most tasks handed to one actor and not yet finished (the cap of the
    /// adaptive prefetch).
    pub const PREFETCH: usize = 512;
    /// Most entries fetched by one read.
    pub const READ_COUNT: usize = 1000;
    /// How long one blocking read waits when the queues are empty, ms.
    pub const BLOCK_MS: u64 = 500;
    /// Bytes of each actor's task ring.
    pub const TASK_RING_BYTES: usize = 8 << 20;
    /// Bytes of each actor's result ring.
    pub const RESULT_RING_BYTES: usize = 1 << 20;
    /// Approximate bound of each dead-letter stream.
    pub const DEAD_MAX_LENGTH: usize = 100_000;
    /// Async tasks one actor runs at once.
    pub const CONCURRENCY: usize = 100;
    /// How long a stopping dispatcher keeps trying to write the outcomes of
    /// finished tasks after its running tasks ended, ms. Past it, they stay
    /// pending in Redis (and run again): a stop never waits for Redis.
    pub const WRITE_GRACE_MS: u64 = 5_000;
    /// How much work an actor is given ahead, in handler time (µs): enough
    /// to keep it busy between two reads, little enough that what a killed
    /// engine held (and will run again) stays small.
    pub const PREFETCH_WORK_US: u64 = 50_000;
    /// Extra time an async task gets past its timeout before the dispatcher
    /// concludes its event loop is blocked and kills the actor, ms.
    pub const ASYNC_GRACE_MS: u64 = 1_000;
    /// How long a cancelled task may run on before its actor is killed, ms
    /// (`Engine(cancel_grace=...)`).
    pub const CANCEL_GRACE_MS: u64 = 5_000;
    /// Most task-history events each queue's events stream holds while no
    /// history process writes them (`PostgreSQL` slow or down); the oldest
    /// are dropped past it, and counted.
    pub const HISTORY_BUFFER: u64 = 1_000_000;
    /// Most summaries of completed tasks (`retention`) each queue keeps;
    /// the oldest go first past it.
    pub const RETENTION_MAX_LENGTH: u64 = 100_000;
}

/// How a dispatcher runs.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "python", derive(pyo3::FromPyObject))]
#[cfg_attr(feature = "python", pyo3(from_item_all))]
pub struct Settings {
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
    /// Strict priority: a queue's tasks are read only while every queue
    /// before it has none ready, and each actor holds one task ahead at
    /// most (weighted reads otherwise).
    pub strict: bool,
    /// Most tasks handed to one actor and not yet finished.
    pub prefetch: usize,
    /// Most entries fetched by one read.
    pub read_count: usize,
    /// How long one blocking read waits when the queues are empty.
    pub block_ms: u64,
    /// How long a graceful stop waits for running tasks.
    pub shutdown_timeout_ms: u64,
    /// How long a cancelled task may run on before its actor is killed.
    pub cancel_grace_ms: u64,
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
    /// Global rate limits: `(task type, tasks, per period ms)`.
    pub rate_limits: Vec<(String, u64, u64)>,
    /// Global concurrency limits: `(task type, most running at once)`.
    pub concurrency_limits: Vec<(String, u32)>,
    /// Record every task's lifecycle in the queues' events streams, for the
    /// history process to write into `PostgreSQL`.
    pub history: bool,
    /// Most events each queue's events stream holds.
    pub history_buffer: u64,
    /// Most summaries of completed tasks each queue keeps.
    pub retention_max_length: u64,
}

impl Settings {
    /// Settings for `url` and `queues` with every default (for tests).
    #[must_use]
    pub fn new(url: &str, queues: &[(&str, u32)]) -> Self {
        Self {
            url: url.to_owned(),
            prefix: "flumeq".to_owned(),
            queues: queues
                .iter()
                .map(|(name, weight)| ((*name).to_owned(), *weight))
                .collect(),
            group: "flumeq".to_owned(),
            consumer: "test".to_owned(),
            burst: false,
            strict: false,
            prefetch: defaults::PREFETCH,
            read_count: defaults::READ_COUNT,
            block_ms: defaults::BLOCK_MS,
            shutdown_timeout_ms: 30_000,
            cancel_grace_ms: defaults::CANCEL_GRACE_MS,
            dead_max_length: defaults::DEAD_MAX_LENGTH,
            claim_stale_after_ms: 300_000,
            retry_base_ms: 1_000,
            retry_max_ms: 600_000,
            processed_ttl_ms: 86_400_000,
            registry: Vec::new(),
            heartbeat_ms: 0,
            rate_limits: Vec::new(),
            concurrency_limits: Vec::new(),
            history: false,
            history_buffer: defaults::HISTORY_BUFFER,
            retention_max_length: defaults::RETENTION_MAX_LENGTH,
        }
    }

    /// The settings with out-of-range values brought into range.
    #[must_use]
    pub fn checked(mut self) -> Self {
        self.prefetch = self.prefetch.max(1);
        self.read_count = self.read_count.max(1);
        self.claim_stale_after_ms = self.claim_stale_after_ms.max(1);
        self.processed_ttl_ms = self.processed_ttl_ms.max(1);
        self
    }
}
