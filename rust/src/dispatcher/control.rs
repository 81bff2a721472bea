//! The control poll: what people asked of every engine through Redis.
//!
//! - The paused queues: `<prefix>:paused` is the set of queue names no
//!   engine may start tasks of (`Client.pause` / `resume`).
//! - The cancels: each queue's `cancels` ZSET names the tasks cancelled
//!   while an engine held them (`Client.cancel`), scored by the time of the
//!   cancel; each engine reads what is new since its own cursor.
//!
//! Both are records in Redis, not messages: an engine that was away (a
//! reconnect, a restart) reads them when it comes back, so none is lost.
//!
//! Every `POLL` one pipeline (`SMEMBERS` plus one `ZRANGEBYSCORE` per queue)
//! on a clone of the write connection; the event loop hears of changes only
//! (a `watch` channel for the pauses, new cancels on an unbounded channel).
//! While Redis is away the last answer stands.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::connection::Link;
use bytes::Bytes;
use redis::{RedisResult, Value};
use tokio::sync::{mpsc, watch};

use super::patience::Patience;
use super::{now_ms, Background};
use crate::keys::{Keys, CANCEL_TTL_MS};
use crate::streams::QueueSpec;

/// Time between two polls: a pause or a cancel reaches every engine within
/// about this (plus a batch already handed to an actor, which checks at
/// each task).
pub const POLL: Duration = Duration::from_millis(250);

/// Per queue served (in the engine's order): whether it is paused.
pub type Paused = Arc<Vec<bool>>;

/// A task cancelled while some engine held it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancel {
    /// Index of its queue in the engine's list.
    pub queue: u16,
    /// Its task id.
    pub id: Bytes,
    /// When the record expires (ms since the epoch).
    pub expires_ms: u64,
}

/// What one poll read.
pub struct Snapshot {
    /// The paused queues.
    pub paused: Paused,
    /// Cancels recorded since the last poll (some may be repeats).
    pub cancels: Vec<Cancel>,
}

/// The poll's parameters.
pub struct Control {
    /// Its own handle on the write connection.
    pub connection: Link,
    /// Key names.
    pub keys: Keys,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
    /// Per queue: the time (ms) of the newest cancel read so far, read again
    /// with the next poll (records of the same millisecond may follow it).
    cursors: Vec<Option<u64>>,
}

/// The `[member, score, ...]` reply of `ZRANGEBYSCORE ... WITHSCORES`.
fn scored(reply: &Value) -> Vec<(Bytes, u64)> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .chunks_exact(2)
        .filter_map(|pair| {
            let member = match &pair[0] {
                Value::BulkString(bytes) => Bytes::copy_from_slice(bytes),
                _ => return None,
            };
            let score = match &pair[1] {
                Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse::<f64>().ok()?,
                Value::Double(score) => *score,
                Value::Int(score) => *score as f64,
                _ => return None,
            };
            (score >= 0.0).then_some((member, score as u64))
        })
        .collect()
}

impl Control {
    /// The poll for `queues`, reading every cancel record at its first read.
    #[must_use]
    pub fn new(connection: Link, keys: Keys, queues: Arc<Vec<QueueSpec>>) -> Self {
        let cursors = vec![None; queues.len()];
        Self {
            connection,
            keys,
            queues,
            cursors,
        }
    }

    /// The paused queues and the new cancels (one round trip).
    pub async fn read(&mut self) -> RedisResult<Snapshot> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(self.keys.paused());
        for (queue, cursor) in self.queues.iter().zip(&self.cursors) {
            let from = cursor.map_or_else(|| "-inf".to_owned(), |at| at.to_string());
            pipe.cmd("ZRANGEBYSCORE")
                .arg(self.keys.cancels(&queue.name))
                .arg(from)
                .arg("+inf")
                .arg("WITHSCORES");
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.connection).await?;
        let mut replies = replies.into_iter();
        let names: BTreeSet<String> = match replies.next() {
            Some(reply) => redis::from_redis_value(reply)?,
            None => BTreeSet::new(),
        };
        let paused = Arc::new(
            self.queues
                .iter()
                .map(|queue| names.contains(&queue.name))
                .collect(),
        );
        let now = now_ms();
        let mut cancels = Vec::new();
        for (at, reply) in replies.enumerate() {
            for (id, cancelled_at) in scored(&reply) {
                let cursor = &mut self.cursors[at];
                *cursor = Some(cursor.map_or(cancelled_at, |seen| seen.max(cancelled_at)));
                let expires_ms = cancelled_at + CANCEL_TTL_MS;
                if expires_ms > now {
                    cancels.push(Cancel {
                        queue: at as u16,
                        id,
                        expires_ms,
                    });
                }
            }
        }
        Ok(Snapshot { paused, cancels })
    }

    /// A read retried until Redis answers: at start-up, before any task is
    /// read (the caller races it against a stop request), and each poll.
    pub async fn read_retrying(&mut self) -> Snapshot {
        let mut patience = Patience::capped("reading the paused queues and cancels", POLL * 4);
        loop {
            match self.read().await {
                Ok(snapshot) => {
                    patience.done();
                    return snapshot;
                }
                Err(error) => patience.wait(&error).await,
            }
        }
    }

    /// Starts polling from `first` (what start-up read); the receivers
    /// see each change of the pauses and every new cancel.
    #[must_use]
    pub fn start(
        self,
        first: Paused,
    ) -> (
        Background,
        watch::Receiver<Paused>,
        mpsc::UnboundedReceiver<Vec<Cancel>>,
    ) {
        let (sender, receiver) = watch::channel(first);
        let (cancel_sender, cancels) = mpsc::unbounded_channel();
        (
            Background::spawn(self.run(sender, cancel_sender)),
            receiver,
            cancels,
        )
    }

    async fn run(
        mut self,
        sender: watch::Sender<Paused>,
        cancel_sender: mpsc::UnboundedSender<Vec<Cancel>>,
    ) {
        loop {
            tokio::time::sleep(POLL).await;
            let Snapshot { paused, cancels } = self.read_retrying().await;
            sender.send_if_modified(|current| {
                let changed = **current != *paused;
                if changed {
                    *current = paused;
                }
                changed
            });
            if !cancels.is_empty() && cancel_sender.send(cancels).is_err() {
                return;
            }
            if sender.is_closed() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scored_replies_skip_what_is_not_a_member_and_a_score() {
        let reply = Value::Array(vec![
            Value::BulkString(b"a".to_vec()),
            Value::BulkString(b"1700000000000".to_vec()),
            Value::Int(3),
            Value::BulkString(b"5".to_vec()),
            Value::BulkString(b"b".to_vec()),
            Value::Double(12.0),
        ]);
        assert_eq!(
            scored(&reply),
            [
                (Bytes::from_static(b"a"), 1_700_000_000_000),
                (Bytes::from_static(b"b"), 12)
            ]
        );
        assert!(scored(&Value::Nil).is_empty());
    }
}
