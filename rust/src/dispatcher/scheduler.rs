//! The delayed-task mover: moves due tasks from each queue's delayed ZSET to
//! its stream with one atomic Lua script (`scripts::MOVE_DUE`), then sleeps
//! until the next task is due, but at most `POLL`, so tasks scheduled by
//! clients meanwhile are seen within ~100 ms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::connection::Link;
use redis::RedisResult;

use super::patience::Patience;
use super::{now_ms, Background};
use crate::keys::Keys;
use crate::scripts;
use crate::streams::QueueSpec;

/// Longest sleep between two passes.
const POLL: Duration = Duration::from_millis(100);
/// Most tasks one script call moves (bounds the time Redis spends in it).
const MOVE_AT_MOST: usize = 1000;

/// What the mover tells the dispatcher (for burst mode's "nothing left").
#[derive(Debug, Default)]
pub struct DelayedState {
    /// Delayed tasks left after the last pass, over all queues.
    pub left: AtomicU64,
    /// 1 + the value of `written` when the last complete pass started
    /// (0 = no pass completed yet).
    pub pass_after_write: AtomicU64,
    /// Writes of outcomes done so far (bumped by the writer).
    pub written: AtomicU64,
}

/// The mover's parameters.
pub struct Scheduler {
    /// Its own handle on the write connection.
    pub connection: Link,
    /// Key names.
    pub keys: Keys,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
    /// Bound of dead-letter streams (for malformed delayed members).
    pub dead_max_length: usize,
    /// Shared progress.
    pub state: Arc<DelayedState>,
}

impl Scheduler {
    /// Starts the mover (stopping it anywhere is safe: each pass is atomic).
    #[must_use]
    pub fn start(self) -> Background {
        Background::spawn(self.run())
    }

    async fn pass(&mut self, script: &redis::Script) -> RedisResult<(u64, Option<u64>, bool)> {
        let now = now_ms();
        let mut left = 0;
        let mut next_due: Option<u64> = None;
        let mut more = false;
        for queue in self.queues.iter() {
            // EVALSHA (loading the script once): an idle engine runs this
            // ten times a second per queue.
            let (moved, next, remaining): (usize, i64, u64) = script
                .key(self.keys.delayed(&queue.name))
                .key(&queue.stream)
                .key(self.keys.dead(&queue.name))
                .arg(now)
                .arg(MOVE_AT_MOST)
                .arg(self.dead_max_length)
                .invoke_async(&mut self.connection)
                .await?;
            left += remaining;
            more |= moved == MOVE_AT_MOST;
            if next >= 0 {
                let next = next as u64;
                next_due = Some(next_due.map_or(next, |due| due.min(next)));
            }
        }
        Ok((left, next_due, more))
    }

    async fn run(mut self) {
        let script = redis::Script::new(scripts::MOVE_DUE);
        let mut patience = Patience::new("moving due delayed tasks");
        loop {
            let written = self.state.written.load(Ordering::SeqCst);
            match self.pass(&script).await {
                Ok((left, next_due, more)) => {
                    patience.done();
                    self.state.left.store(left, Ordering::SeqCst);
                    self.state
                        .pass_after_write
                        .store(written + 1, Ordering::SeqCst);
                    if more {
                        continue;
                    }
                    let sleep = next_due.map_or(POLL, |due| {
                        Duration::from_millis(due.saturating_sub(now_ms()).max(1)).min(POLL)
                    });
                    tokio::time::sleep(sleep).await;
                }
                Err(error) => patience.wait(&error).await,
            }
        }
    }
}
