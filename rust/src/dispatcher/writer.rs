//! The outcome writer: a task on its own connection that writes whatever
//! outcomes the event loop sends, merging everything that piled up while its
//! previous pipeline was in flight (one round trip per batch, whatever its
//! size). While Redis is away it retries with backoff, replaying a write
//! harmlessly (see `streams::writer::write_outcomes`).
//!
//! At shutdown it gets a deadline: what it could not write by then is
//! counted and left; those tasks stay pending in Redis and run again, so a
//! stop never waits on Redis for long, and nothing is lost.
//!
//! With Sentinel, each batch is meant for the master it was booked for (its
//! generation, see `Book::current`): once the sentinels name another, the
//! batch is not written (its entry ids may name other tasks there); its
//! tasks are pending on the new master or not delivered there yet, and run
//! again. The connection is pinned to that generation for each attempt, so
//! a master change between the check and the send refuses the send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connection::Link;
use log::{debug, error, info, warn};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::now_ms;
use super::patience::Patience;
use super::scheduler::DelayedState;
use crate::keys::Keys;
use crate::streams::writer::{self as store, Attempt, WriteError, WriteSettings};
use crate::streams::{QueueOutcomes, QueueSpec};

/// The writer's parameters.
pub struct Writer {
    /// Its own handle on the write connection.
    pub connection: Link,
    /// Key names.
    pub keys: Keys,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
    /// How outcomes are written.
    pub settings: WriteSettings,
    /// Progress shared with the mover and the burst check.
    pub delayed: Arc<DelayedState>,
    /// Raised when a batch meant for an earlier master is dropped: the
    /// dispatcher then takes back its own pending entries.
    pub lost_reply: Arc<AtomicBool>,
}

/// One batch for the writer: the outcomes per queue, and the generation of
/// the master they are meant for.
type Batch = (Vec<QueueOutcomes>, u64);

/// A running writer.
pub struct WriterHandle {
    sender: mpsc::UnboundedSender<Batch>,
    deadline: watch::Sender<Option<Instant>>,
    task: JoinHandle<usize>,
    /// Messages sent so far.
    pub sent: u64,
}

impl Writer {
    /// Starts the writer.
    #[must_use]
    pub fn start(self) -> WriterHandle {
        let (sender, receiver) = mpsc::unbounded_channel();
        let (deadline, watcher) = watch::channel(None);
        let task = tokio::spawn(self.run(receiver, watcher));
        WriterHandle {
            sender,
            deadline,
            task,
            sent: 0,
        }
    }

    async fn run(
        mut self,
        mut receiver: mpsc::UnboundedReceiver<Batch>,
        mut deadline: watch::Receiver<Option<Instant>>,
    ) -> usize {
        // Sequence numbers of this life start from the clock, so they never
        // repeat one of an earlier life of the same consumer name.
        let mut seq = now_ms().saturating_mul(1000);
        // Outcomes waiting to be written are tasks another engine might run
        // again: retry soon after Redis is back, not after a long backoff.
        let mut patience = Patience::capped("writing task outcomes", Duration::from_millis(250));
        while let Some((mut merged, mut generation)) = receiver.recv().await {
            let mut messages = 1;
            while let Ok((more, made_for)) = receiver.try_recv() {
                for (into, from) in merged.iter_mut().zip(more) {
                    into.merge(from);
                }
                generation = generation.min(made_for);
                messages += 1;
            }
            seq += 1;
            let mut replay = false;
            loop {
                let due = *deadline.borrow();
                if due.is_some_and(|due| Instant::now() >= due) {
                    let mut left: usize = merged.iter().map(QueueOutcomes::tasks).sum();
                    while let Ok(more) = receiver.try_recv() {
                        left += more.0.iter().map(QueueOutcomes::tasks).sum::<usize>();
                    }
                    return left;
                }
                if self.meant_for_another(&merged, generation, messages) {
                    break;
                }
                self.connection.pin(Some(generation));
                let result = {
                    let write = store::write_outcomes(
                        &mut self.connection,
                        &self.keys,
                        &self.queues,
                        &self.settings,
                        &merged,
                        now_ms(),
                        Attempt { seq, replay },
                    );
                    tokio::pin!(write);
                    // A deadline set while the write is in flight cuts it short.
                    loop {
                        let due = *deadline.borrow();
                        tokio::select! {
                            result = &mut write => break result,
                            () = sleep_until(due) => break Err(WriteError::Redis(timed_out())),
                            () = changed(&mut deadline) => {}
                        }
                    }
                };
                match result {
                    Ok(()) => {
                        patience.done();
                        self.delayed.written.fetch_add(messages, Ordering::SeqCst);
                        break;
                    }
                    Err(WriteError::Refused(reason)) => {
                        let tasks: usize = merged.iter().map(QueueOutcomes::tasks).sum();
                        error!(
                            "{reason}; dropping the outcomes of {tasks} task(s): they stay \
                             pending in redis and run again (this is a bug: please report it)"
                        );
                        patience.done();
                        self.delayed.written.fetch_add(messages, Ordering::SeqCst);
                        break;
                    }
                    Err(WriteError::NoScript) => {
                        replay = true;
                        let load = self.settings.scripts.load(&mut self.connection);
                        let loaded = match due {
                            Some(due) => tokio::time::timeout_at(due.into(), load)
                                .await
                                .unwrap_or_else(|_| Err(timed_out())),
                            None => load.await,
                        };
                        if let Err(error) = loaded {
                            debug!("loading scripts failed: {error}");
                        }
                    }
                    Err(error) => {
                        replay = true;
                        let delay = patience.next_delay(&error);
                        let due = *deadline.borrow();
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = sleep_until(due) => {}
                            () = changed(&mut deadline) => {}
                        }
                    }
                }
            }
        }
        let due = *deadline.borrow();
        self.connection.pin(None);
        self.forget_markers(due).await;
        0
    }

    /// Whether the batch was meant for a master the sentinels no longer
    /// name; then it is dropped (counted as written: nothing waits on it).
    fn meant_for_another(&self, merged: &[QueueOutcomes], generation: u64, messages: u64) -> bool {
        if self
            .connection
            .generation()
            .is_none_or(|now| now == generation)
        {
            return false;
        }
        let tasks: usize = merged.iter().map(QueueOutcomes::tasks).sum();
        info!(
            "the sentinels name another master: the outcomes of {tasks} task(s) read from \
             the one before are not written; those tasks run again"
        );
        self.lost_reply.store(true, Ordering::SeqCst);
        self.delayed.written.fetch_add(messages, Ordering::SeqCst);
        true
    }

    /// After the last write, the write markers are not needed any more.
    async fn forget_markers(&mut self, deadline: Option<Instant>) {
        let mut pipe = redis::pipe();
        for queue in self.queues.iter() {
            pipe.cmd("DEL")
                .arg(self.keys.written(&queue.name, &self.settings.consumer))
                .ignore();
        }
        let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let deleted =
            tokio::time::timeout_at(until.into(), pipe.query_async::<()>(&mut self.connection))
                .await;
        if !matches!(deleted, Ok(Ok(()))) {
            debug!("write markers not removed; they expire by themselves");
        }
    }
}

/// Resolves at `due`, never without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the deadline is set (never once nobody can set it).
async fn changed(deadline: &mut watch::Receiver<Option<Instant>>) {
    if deadline.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no reply before the shutdown deadline",
    ))
}

impl WriterHandle {
    /// Queues outcomes for writing.
    /// Queues `outcomes`, meant for the master of `generation`.
    pub fn send(&mut self, outcomes: Vec<QueueOutcomes>, generation: u64) {
        // The writer only stops when this handle is shut down.
        if self.sender.send((outcomes, generation)).is_ok() {
            self.sent += 1;
        }
    }

    /// Writes what is queued, giving up at `deadline`; returns how many
    /// finished tasks' outcomes could not be written (they stay pending).
    pub async fn shutdown(self, deadline: Instant) -> usize {
        let Self {
            sender,
            deadline: set_deadline,
            task,
            ..
        } = self;
        drop(sender);
        let _ = set_deadline.send(Some(deadline));
        // A last bound, should a write ignore its timeout.
        let backstop = deadline + Duration::from_secs(2);
        match tokio::time::timeout_at(backstop.into(), task).await {
            Ok(Ok(left)) => left,
            Ok(Err(error)) => {
                warn!("outcome writer failed: {error}");
                0
            }
            Err(_) => {
                warn!("outcome writer did not stop in time");
                0
            }
        }
    }
}
