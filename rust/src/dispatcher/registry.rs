//! The worker registry: each engine says it is alive, and how it is doing.
//!
//! Every `interval` the dispatcher writes its engine's hash
//! `<prefix>:worker:<consumer>` (the fields the engine gave at start, plus
//! `heartbeat` and its counters), sets the hash to expire after `ttl`, and
//! scores the consumer in the sorted set `<prefix>:workers` with the
//! heartbeat time. Entries older than `ttl` are dropped from the set by
//! whoever beats next, so an engine killed with -9 disappears by itself. A
//! graceful stop removes the engine's entry at once.
//!
//! A beat runs in its own task on a clone of the write connection and is
//! skipped while the previous one is still in flight (Redis away): the
//! registry never slows the task path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connection::Link;
use log::debug;

use super::{now_ms, Report};
use crate::keys::Keys;

/// One engine's entry in the registry.
pub struct Registry {
    connection: Link,
    workers: String,
    worker: String,
    consumer: String,
    fields: Vec<(String, String)>,
    interval: Duration,
    ttl_ms: u64,
    last: Option<Instant>,
    busy: Arc<AtomicBool>,
}

impl Registry {
    /// An entry for `consumer` with the engine's own `fields` (host, pid,
    /// queues...). `interval` 0 turns the registry off.
    #[must_use]
    pub fn new(
        connection: Link,
        keys: &Keys,
        consumer: &str,
        fields: Vec<(String, String)>,
        interval: Duration,
    ) -> Self {
        Self {
            connection,
            workers: keys.workers(),
            worker: keys.worker(consumer),
            consumer: consumer.to_owned(),
            fields,
            interval,
            ttl_ms: (interval.as_millis() as u64).saturating_mul(5).max(1),
            last: None,
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Writes a heartbeat if one is due and none is in flight.
    pub fn beat(&mut self, report: &Report, in_flight: usize) {
        if self.interval.is_zero() || self.last.is_some_and(|last| last.elapsed() < self.interval) {
            return;
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        self.last = Some(Instant::now());
        let now = now_ms();
        let mut pipe = redis::pipe();
        let hset = pipe.cmd("HSET").arg(&self.worker);
        for (name, value) in &self.fields {
            hset.arg(name).arg(value);
        }
        for (name, value) in [
            ("heartbeat", now),
            ("processed", report.processed),
            ("failed", report.failed),
            ("retried", report.retried),
            ("dead", report.dead),
            ("skipped", report.skipped),
            ("restarts", report.restarts),
            ("in_flight", in_flight as u64),
        ] {
            hset.arg(name).arg(value);
        }
        hset.ignore();
        pipe.cmd("PEXPIRE")
            .arg(&self.worker)
            .arg(self.ttl_ms)
            .ignore()
            .cmd("ZADD")
            .arg(&self.workers)
            .arg(now)
            .arg(&self.consumer)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&self.workers)
            .arg("-inf")
            // Generous, so clock skew between hosts never drops a live peer;
            // readers go by the hash's expiry anyway.
            .arg(format!("({}", now.saturating_sub(self.ttl_ms * 6)))
            .ignore();
        let mut connection = self.connection.clone();
        let busy = Arc::clone(&self.busy);
        tokio::spawn(async move {
            if let Err(error) = pipe.query_async::<()>(&mut connection).await {
                debug!("heartbeat not written: {error}");
            }
            busy.store(false, Ordering::SeqCst);
        });
    }

    /// Removes this engine's entry (graceful stop); gives up after a second.
    pub async fn leave(&mut self) {
        if self.interval.is_zero() {
            return;
        }
        // A beat still in flight would write the entry again after us.
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.busy.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(&self.worker)
            .ignore()
            .cmd("ZREM")
            .arg(&self.workers)
            .arg(&self.consumer)
            .ignore();
        let removed = tokio::time::timeout(
            Duration::from_secs(1),
            pipe.query_async::<()>(&mut self.connection),
        )
        .await;
        if !matches!(removed, Ok(Ok(()))) {
            debug!("registry entry not removed; it expires by itself");
        }
    }
}
