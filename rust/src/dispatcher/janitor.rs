//! The janitor: once a minute, removes consumers of the group that have
//! nothing pending and have been idle for more than twice
//! `claim_stale_after` (engines that died and whose tasks were claimed).

use std::sync::Arc;
use std::time::Duration;

use log::{debug, info};
use redis_protocol::resp2::types::BytesFrame;

use super::Background;
use crate::streams::reader::{ReadError, Reader};
use crate::streams::{reply, QueueSpec};

/// How often dead consumers are looked for, at most.
const EVERY: Duration = Duration::from_secs(60);

/// The janitor's parameters.
pub struct Janitor {
    /// Its own read connection.
    pub reader: Reader,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
    /// Consumer group.
    pub group: String,
    /// This engine's consumer name (never removed).
    pub consumer: String,
    /// Idle time after which another engine's entry is claimed, ms.
    pub stale_ms: u64,
}

impl Janitor {
    /// Starts the loop.
    #[must_use]
    pub fn start(self) -> Background {
        Background::spawn(self.run())
    }

    fn period(&self) -> Duration {
        // Tests run with tiny stale times; production waits a minute.
        (Duration::from_millis(self.stale_ms) * 2).clamp(Duration::from_millis(200), EVERY)
    }

    async fn run(mut self) {
        loop {
            tokio::time::sleep(self.period()).await;
            if let Err(error) = self.remove_dead_consumers().await {
                debug!("looking for dead consumers failed: {error}");
            }
        }
    }

    async fn remove_dead_consumers(&mut self) -> Result<(), ReadError> {
        let idle_limit = (self.stale_ms * 2) as i64;
        for queue in self.queues.iter() {
            let mut cmd = redis::cmd("XINFO");
            cmd.arg("CONSUMERS").arg(&queue.stream).arg(&self.group);
            let mut replies = self.reader.query(std::slice::from_ref(&cmd)).await?;
            let Some(BytesFrame::Array(consumers)) = replies.pop() else {
                continue;
            };
            for consumer in consumers {
                let BytesFrame::Array(fields) = consumer else {
                    continue;
                };
                let mut name = None;
                let mut pending = None;
                let mut idle = None;
                for pair in fields.chunks(2) {
                    match (
                        pair.first().and_then(reply::text).map(AsRef::as_ref),
                        pair.get(1),
                    ) {
                        (Some(b"name"), Some(value)) => name = reply::text(value).cloned(),
                        (Some(b"pending"), Some(value)) => pending = reply::integer(value),
                        (Some(b"idle"), Some(value)) => idle = reply::integer(value),
                        _ => {}
                    }
                }
                let (Some(name), Some(0), Some(idle)) = (name, pending, idle) else {
                    continue;
                };
                if idle > idle_limit && name.as_ref() != self.consumer.as_bytes() {
                    let mut delete = redis::cmd("XGROUP");
                    delete
                        .arg("DELCONSUMER")
                        .arg(&queue.stream)
                        .arg(&self.group)
                        .arg(name.as_ref());
                    self.reader.query(std::slice::from_ref(&delete)).await?;
                    info!(
                        "removed idle consumer {} from {}",
                        String::from_utf8_lossy(&name),
                        queue.stream
                    );
                }
            }
        }
        Ok(())
    }
}
