//! Recovery of dead engines' tasks, and cleanup of dead consumers.
//!
//! Every `claim_stale_after / 2` (at most 30 s) it walks `XAUTOCLAIM`'s cursor
//! over each queue, taking entries idle longer than `claim_stale_after`. Live
//! engines keep their own entries fresh (see `Dispatcher::refresh_held`), so
//! only a dead engine's entries get that old. Claimed entries go to the
//! dispatcher through a channel of one page, so they are taken only as fast
//! as the actors have room. Each claimed entry comes with its delivery count,
//! which bounds poison tasks that keep killing whole engines.
//!
//! Once a minute it also removes consumers that have nothing pending and
//! have been idle for more than twice `claim_stale_after`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{info, warn};
use redis_protocol::resp2::types::BytesFrame;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::envelope::RawEntry;
use crate::streams::reader::{ReadError, Reader};
use crate::streams::{reply, QueueSpec};

/// Entries per `XAUTOCLAIM` call.
const PAGE: usize = 100;
/// How often dead consumers are looked for.
const JANITOR_EVERY: Duration = Duration::from_secs(60);

/// A claimed entry: queue index, the entry, and how often it was delivered.
pub type Claimed = (u16, RawEntry, u64);

/// The recovery loop's parameters.
pub struct Recovery {
    /// Its own read connection.
    pub reader: Reader,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
    /// Consumer group.
    pub group: String,
    /// This engine's consumer name.
    pub consumer: String,
    /// Idle time after which an entry is taken from its consumer, ms.
    pub stale_ms: u64,
    /// Where claimed pages go.
    pub sender: mpsc::Sender<Vec<Claimed>>,
    /// Raised when a claim's reply may have been lost (it may have made
    /// entries ours that we never saw); the dispatcher then re-reads its own
    /// pending entries.
    pub lost_reply: Arc<AtomicBool>,
}

fn bulk(frame: &BytesFrame) -> Option<&Bytes> {
    match frame {
        BytesFrame::BulkString(bytes) | BytesFrame::SimpleString(bytes) => Some(bytes),
        _ => None,
    }
}

fn integer(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Integer(value) => Some(*value),
        _ => None,
    }
}

impl Recovery {
    /// Starts the loop; abort the handle to stop it.
    #[must_use]
    pub fn start(self) -> JoinHandle<()> {
        tokio::spawn(self.run())
    }

    fn period(&self) -> Duration {
        Duration::from_millis(self.stale_ms / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(30))
    }

    async fn run(mut self) {
        let mut failing = false;
        let mut janitor_at = Instant::now() + JANITOR_EVERY.min(self.period() * 4);
        loop {
            tokio::time::sleep(self.period()).await;
            let mut result = self.claim_all().await;
            if result.is_ok() && Instant::now() >= janitor_at {
                result = self.remove_dead_consumers().await;
                janitor_at = Instant::now() + JANITOR_EVERY;
            }
            match result {
                Ok(true) => {
                    if failing {
                        info!("recovery: redis is back");
                        failing = false;
                    }
                }
                // The dispatcher is gone: stop.
                Ok(false) => return,
                Err(error) => {
                    if error.reply_may_be_lost() {
                        self.lost_reply.store(true, Ordering::SeqCst);
                    }
                    if !failing {
                        warn!("recovery of stale tasks failed ({error}); will retry");
                        failing = true;
                    }
                }
            }
        }
    }

    /// Claims every stale entry of every queue. `Ok(false)` when the
    /// dispatcher no longer listens.
    async fn claim_all(&mut self) -> Result<bool, ReadError> {
        for index in 0..self.queues.len() {
            let stream = self.queues[index].stream.clone();
            let mut cursor = Bytes::from_static(b"0-0");
            loop {
                let mut cmd = redis::cmd("XAUTOCLAIM");
                cmd.arg(&stream)
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(self.stale_ms)
                    .arg(cursor.as_ref())
                    .arg("COUNT")
                    .arg(PAGE);
                let mut replies = self.reader.query(std::slice::from_ref(&cmd)).await?;
                let Some(BytesFrame::Array(mut parts)) = replies.pop() else {
                    break;
                };
                if parts.len() < 2 {
                    break;
                }
                let entries = reply::entries(parts.swap_remove(1));
                let next = bulk(&parts[0])
                    .cloned()
                    .unwrap_or_else(|| Bytes::from_static(b"0-0"));
                if !entries.is_empty() {
                    let claimed = self.with_deliveries(index as u16, &stream, entries).await?;
                    info!("claimed {} stale task(s) from {stream}", claimed.len());
                    if self.sender.send(claimed).await.is_err() {
                        return Ok(false);
                    }
                }
                if next.as_ref() == b"0-0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(true)
    }

    async fn with_deliveries(
        &mut self,
        queue: u16,
        stream: &str,
        entries: Vec<RawEntry>,
    ) -> Result<Vec<Claimed>, ReadError> {
        let commands: Vec<redis::Cmd> = entries
            .iter()
            .map(|entry| {
                let mut cmd = redis::cmd("XPENDING");
                cmd.arg(stream)
                    .arg(&self.group)
                    .arg(entry.entry_id.as_ref())
                    .arg(entry.entry_id.as_ref())
                    .arg(1);
                cmd
            })
            .collect();
        let replies = self.reader.query(&commands).await?;
        Ok(entries
            .into_iter()
            .zip(replies)
            .map(|(entry, reply)| {
                let deliveries = match reply {
                    BytesFrame::Array(rows) => rows.first().and_then(|row| match row {
                        BytesFrame::Array(fields) => fields.get(3).and_then(integer),
                        _ => None,
                    }),
                    _ => None,
                };
                (queue, entry, deliveries.unwrap_or(1).max(1) as u64)
            })
            .collect())
    }

    async fn remove_dead_consumers(&mut self) -> Result<bool, ReadError> {
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
                    match (pair.first().and_then(bulk).map(AsRef::as_ref), pair.get(1)) {
                        (Some(b"name"), Some(value)) => name = bulk(value).cloned(),
                        (Some(b"pending"), Some(value)) => pending = integer(value),
                        (Some(b"idle"), Some(value)) => idle = integer(value),
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
        Ok(true)
    }
}
