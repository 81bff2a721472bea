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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use log::{info, warn};
use redis_protocol::resp2::types::BytesFrame;
use tokio::sync::mpsc;

use super::Background;

use crate::envelope::RawEntry;
use crate::streams::reader::{self, ReadError, Reader};
use crate::streams::{reply, QueueSpec};

/// Entries per `XAUTOCLAIM` call.
const PAGE: usize = 100;

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

impl Recovery {
    /// Starts the loop.
    #[must_use]
    pub fn start(self) -> Background {
        Background::spawn(self.run())
    }

    fn period(&self) -> Duration {
        Duration::from_millis(self.stale_ms / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(30))
    }

    async fn run(mut self) {
        let mut failing = false;
        loop {
            tokio::time::sleep(self.period()).await;
            match self.claim_all().await {
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
                let next = reply::text(&parts[0])
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
        let counts = reader::deliveries(&mut self.reader, stream, &self.group, &entries).await?;
        Ok(entries
            .into_iter()
            .zip(counts)
            .map(|(entry, count)| (queue, entry, count))
            .collect())
    }
}
