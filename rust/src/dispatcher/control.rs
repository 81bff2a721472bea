//! The control poll: what people asked of every engine through Redis. For
//! now the paused queues: `<prefix>:paused` is the set of queue names no
//! engine may start tasks of (`Client.pause` / `resume`). A record in Redis,
//! not a message: an engine that was away reads it when it comes back.
//!
//! Every `POLL` one `SMEMBERS` on a clone of the write connection; the event
//! loop hears of changes only (a `watch` channel). While Redis is away the
//! last answer stands.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::RedisResult;
use tokio::sync::watch;

use super::patience::Patience;
use super::Background;
use crate::keys::Keys;
use crate::streams::QueueSpec;

/// Time between two polls: a pause reaches every engine within about this
/// (plus a batch already handed to an actor, which checks at each task).
pub const POLL: Duration = Duration::from_millis(250);

/// Per queue served (in the engine's order): whether it is paused.
pub type Paused = Arc<Vec<bool>>;

/// The poll's parameters.
pub struct Control {
    /// Its own handle on the write connection.
    pub connection: ConnectionManager,
    /// Key names.
    pub keys: Keys,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
}

impl Control {
    /// Which of the engine's queues are paused now (one round trip).
    pub async fn read(&mut self) -> RedisResult<Paused> {
        let names: BTreeSet<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.paused())
            .query_async(&mut self.connection)
            .await?;
        Ok(Arc::new(
            self.queues
                .iter()
                .map(|queue| names.contains(&queue.name))
                .collect(),
        ))
    }

    /// A read retried until Redis answers: at start-up, before any task is
    /// read (the caller races it against a stop request), and each poll.
    pub async fn read_retrying(&mut self) -> Paused {
        let mut patience = Patience::capped("reading the paused queues", POLL * 4);
        loop {
            match self.read().await {
                Ok(paused) => {
                    patience.done();
                    return paused;
                }
                Err(error) => patience.wait(&error).await,
            }
        }
    }

    /// Starts polling from `first` (what start-up read); the receiver
    /// sees each change.
    #[must_use]
    pub fn start(self, first: Paused) -> (Background, watch::Receiver<Paused>) {
        let (sender, receiver) = watch::channel(first);
        (Background::spawn(self.run(sender)), receiver)
    }

    async fn run(mut self, sender: watch::Sender<Paused>) {
        loop {
            let paused = self.read_retrying().await;
            sender.send_if_modified(|current| {
                let changed = **current != *paused;
                if changed {
                    *current = paused;
                }
                changed
            });
            if sender.is_closed() {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
