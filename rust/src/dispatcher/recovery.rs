//! Recovery of dead engines' tasks.
//!
//! Every `claim_stale_after / 2` (at most 30 s) it looks, in each queue, for
//! consumers with pending entries and no live engine behind them (no worker
//! registry entry: it expires 10 s after the engine's last heartbeat), and
//! claims their entries idle longer than `claim_stale_after` (`XPENDING
//! IDLE` then `XCLAIM`). Live engines keep their own entries fresh (see
//! `Pool::refresh_held`); checking the registry as well means that a Redis
//! outage, which makes every entry look idle, never hands a live engine's
//! tasks to another. Claimed entries go to the dispatcher through a channel
//! of one page, so they are taken only as fast as the actors have room.
//! Each comes with its delivery count, which bounds poison tasks that keep
//! killing whole engines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use log::{info, warn};
use redis_protocol::resp2::types::BytesFrame;
use tokio::sync::mpsc;

use super::limits::{Admission, Limiter};
use super::Background;

use crate::envelope::RawEntry;
use crate::keys::Keys;
use crate::streams::reader::{self, ReadError, Reader};
use crate::streams::{reply, QueueSpec};

/// Entries per claim.
const PAGE: usize = 100;
/// Most pages claimed from one consumer per pass.
const MAX_PAGES: usize = 1000;

/// A claimed entry: queue index, the entry, and how often it was delivered.
pub type Claimed = (u16, RawEntry, u64);

/// A page of claimed entries, with what the global limits said of them
/// and which master they came from (see `Taken::generation`).
pub type ClaimedPage = (Vec<Claimed>, Admission, u64);

/// The recovery loop's parameters.
pub struct Recovery {
    /// Its own read connection.
    pub reader: Reader,
    /// Key names (the registry, to tell live engines).
    pub keys: Keys,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
    /// Consumer group.
    pub group: String,
    /// This engine's consumer name.
    pub consumer: String,
    /// Idle time after which an entry is taken from its consumer, ms.
    pub stale_ms: u64,
    /// Where claimed pages go.
    pub sender: mpsc::Sender<ClaimedPage>,
    /// The global limits, when there are any.
    pub limiter: Option<Arc<Limiter>>,
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

    /// Claims every stale entry of dead consumers in every queue.
    /// `Ok(false)` when the dispatcher no longer listens.
    async fn claim_all(&mut self) -> Result<bool, ReadError> {
        for index in 0..self.queues.len() {
            let stream = self.queues[index].stream.clone();
            for owner in self.dead_consumers(&stream).await? {
                for _ in 0..MAX_PAGES {
                    let (claimed, full) = self.claim_page(index as u16, &stream, &owner).await?;
                    let generation = self.reader.generation();
                    if !claimed.is_empty() {
                        info!(
                            "claimed {} stale task(s) of dead consumer {} from {stream}",
                            claimed.len(),
                            String::from_utf8_lossy(&owner)
                        );
                        let admission = match &self.limiter {
                            Some(limiter) => {
                                let batch = claimed.iter().map(|(queue, entry, _)| (*queue, entry));
                                // The page is ours in Redis now: a failed
                                // check must have it taken back.
                                limiter
                                    .admit(&mut self.reader, &self.queues, batch)
                                    .await
                                    .map_err(|error| {
                                        ReadError::Protocol(format!("checking the limits: {error}"))
                                    })?
                            }
                            None => Admission::default(),
                        };
                        if self
                            .sender
                            .send((claimed, admission, generation))
                            .await
                            .is_err()
                        {
                            return Ok(false);
                        }
                    }
                    if !full {
                        break;
                    }
                }
            }
        }
        Ok(true)
    }

    /// The consumers of `stream` with pending entries and no live engine
    /// behind them (no registry entry: killed, or gone longer than its
    /// heartbeat's expiry). A live engine keeps its entries fresh, but a
    /// Redis outage can make them look stale all the same: it is never
    /// robbed.
    async fn dead_consumers(&mut self, stream: &str) -> Result<Vec<Bytes>, ReadError> {
        let mut summary = redis::cmd("XPENDING");
        summary.arg(stream).arg(&self.group);
        let mut replies = self.reader.query(std::slice::from_ref(&summary)).await?;
        let Some(BytesFrame::Array(parts)) = replies.pop() else {
            return Ok(Vec::new());
        };
        let owners: Vec<Bytes> = match parts.into_iter().nth(3) {
            Some(BytesFrame::Array(rows)) => rows
                .iter()
                .filter_map(|row| match row {
                    BytesFrame::Array(pair) => pair.first().and_then(reply::text).cloned(),
                    _ => None,
                })
                .filter(|name| name.as_ref() != self.consumer.as_bytes())
                .collect(),
            _ => Vec::new(),
        };
        if owners.is_empty() {
            return Ok(owners);
        }
        let checks: Vec<redis::Cmd> = owners
            .iter()
            .map(|owner| {
                let mut exists = redis::cmd("EXISTS");
                exists.arg(self.keys.worker(&String::from_utf8_lossy(owner)));
                exists
            })
            .collect();
        let alive = self.reader.query(&checks).await?;
        Ok(owners
            .into_iter()
            .zip(alive)
            .filter(|(_, alive)| reply::integer(alive) == Some(0))
            .map(|(owner, _)| owner)
            .collect())
    }

    /// Claims one page of `owner`'s entries idle longer than the stale
    /// time, with their delivery counts (this claim included). Returns
    /// whether the page was full (more may follow).
    async fn claim_page(
        &mut self,
        queue: u16,
        stream: &str,
        owner: &[u8],
    ) -> Result<(Vec<Claimed>, bool), ReadError> {
        let mut pending = redis::cmd("XPENDING");
        pending
            .arg(stream)
            .arg(&self.group)
            .arg("IDLE")
            .arg(self.stale_ms)
            .arg("-")
            .arg("+")
            .arg(PAGE)
            .arg(owner);
        let mut replies = self.reader.query(std::slice::from_ref(&pending)).await?;
        let rows = reader::pending_rows(replies.pop());
        if rows.is_empty() {
            return Ok((Vec::new(), false));
        }
        let mut claim = redis::cmd("XCLAIM");
        claim
            .arg(stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.stale_ms);
        for (id, _) in &rows {
            claim.arg(id.as_ref());
        }
        let mut replies = self.reader.query(std::slice::from_ref(&claim)).await?;
        // Entries deleted meanwhile are dropped from the group, not returned.
        let entries = replies.pop().map(reply::entries).unwrap_or_default();
        let claimed = entries
            .into_iter()
            .map(|entry| {
                let before = rows
                    .iter()
                    .find(|(id, _)| *id == entry.entry_id)
                    .map_or(0, |(_, count)| *count);
                (queue, entry, before + 1)
            })
            .collect();
        Ok((claimed, rows.len() == PAGE))
    }
}
