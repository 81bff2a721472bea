//! The read loop: one outstanding read at a time on the dispatcher's read
//! connection. The event loop asks for a read when actors have room
//! (`request`), and gets what it brought on `results`.
//!
//! A read may first re-read this consumer's own pending entries (at start,
//! and after a reply was lost: a read that ran without its reply reaching us
//! made entries ours that we never saw), with their delivery counts, then
//! takes new entries (`XREADGROUP >`), and sets aside those whose task id is
//! already done. When the engine has global limits, the batch is then
//! checked against them (`limits`) in one more round trip.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use log::info;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::limits::{Admission, Limiter};
use crate::envelope::RawEntry;
use crate::keys::Keys;
use crate::streams::reader::{self, ReadError, Reader};
use crate::streams::{reply, QueueSpec};

/// Own pending entries per page when re-reading them.
const OWN_PAGE: usize = 500;

/// Which of our own pending entries a read takes back first.
#[derive(Debug, Clone, Default)]
pub enum Recover {
    /// None.
    #[default]
    No,
    /// All of them (at start: an earlier life of this consumer name left
    /// them), by re-reading our history; each counts one more delivery.
    All,
    /// Those we do not hold (delivered to us while a reply was lost), by
    /// listing our pending entries and claiming only the others: the ones
    /// we hold and run do not count a delivery more.
    Unheld(Arc<HashSet<Bytes>>),
}

impl Recover {
    /// Whether anything is taken back.
    #[must_use]
    pub fn any(&self) -> bool {
        !matches!(self, Self::No)
    }
}

/// One read to make.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    /// Most new entries to take (0: none, only the re-read).
    pub count: usize,
    /// How long to block when nothing is there, ms (0 = do not block).
    pub block_ms: u64,
    /// Our own pending entries to take back first.
    pub recover: Recover,
    /// Per queue: paused (no new entries are read from it).
    pub paused: super::control::Paused,
    /// Strict priority: a queue is read only when those before it had
    /// fewer than `count` ready.
    pub strict: bool,
}

/// What one read brought.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Our own pending entries (some we may hold), with delivery counts.
    pub own: Vec<(u16, RawEntry, u64)>,
    /// New entries to run.
    pub new: Vec<(u16, RawEntry)>,
    /// New entries whose task id is already done.
    pub done: Vec<(u16, RawEntry)>,
    /// What the global limits said of `own` and `new`.
    pub admission: Admission,
    /// Which master `own` came from (see `Taken::generation`).
    pub own_generation: u64,
    /// Which master `new` and `done` came from.
    pub generation: u64,
}

/// The generation of entries read over connections of several: never the
/// endpoint's, so their outcomes are never written by entry id.
pub const MIXED: u64 = u64::MAX;

/// Folds the generation the connection had after one query into what a
/// part of a read has seen so far.
fn note(seen: &mut Option<u64>, now: u64) {
    *seen = match *seen {
        Some(before) if before != now => Some(MIXED),
        _ => Some(now),
    };
}

/// The read loop's parameters.
pub struct Fetcher {
    /// Its read connection.
    pub reader: Reader,
    /// Key names (done markers).
    pub keys: Keys,
    /// Queues served.
    pub queues: Arc<Vec<QueueSpec>>,
    /// Consumer group.
    pub group: String,
    /// This engine's consumer name.
    pub consumer: String,
    /// The global limits, when there are any.
    pub limiter: Option<Arc<Limiter>>,
    /// Reads keep to Redis Cluster's rule of one slot per command; set when
    /// Redis first answers a read across queues with `CROSSSLOT`.
    pub one_slot: bool,
    /// The generations the replies of the current part of a read came
    /// from (see [`note`]).
    pub seen: Option<u64>,
}

/// A running read loop.
pub struct FetcherHandle {
    requests: mpsc::Sender<ReadRequest>,
    /// What each read brought, in request order.
    pub results: mpsc::Receiver<Result<Fetched, ReadError>>,
    busy: bool,
    task: JoinHandle<()>,
}

impl Fetcher {
    /// Starts the loop.
    #[must_use]
    pub fn start(self) -> FetcherHandle {
        let (requests, mut incoming) = mpsc::channel::<ReadRequest>(1);
        let (replies, results) = mpsc::channel(1);
        let mut reading = self;
        let task = tokio::spawn(async move {
            let mut shares = reader::Shares::default();
            while let Some(request) = incoming.recv().await {
                let fetched = reading.fetch(request, &mut shares).await;
                if replies.send(fetched).await.is_err() {
                    return;
                }
            }
        });
        FetcherHandle {
            requests,
            results,
            busy: false,
            task,
        }
    }

    async fn fetch(
        &mut self,
        request: ReadRequest,
        shares: &mut reader::Shares,
    ) -> Result<Fetched, ReadError> {
        let mut fetched = Fetched::default();
        self.seen = None;
        match &request.recover {
            Recover::No => {}
            Recover::All => fetched.own = self.own_pending().await?,
            Recover::Unheld(held) => fetched.own = self.own_unheld(held).await?,
        }
        fetched.own_generation = self.seen.unwrap_or(MIXED);
        if request.count > 0 {
            let entries = loop {
                let read = reader::read_new(
                    &mut self.reader,
                    &self.queues,
                    &request.paused,
                    request.strict,
                    shares,
                    &self.group,
                    &self.consumer,
                    request.count,
                    request.block_ms,
                    self.one_slot,
                )
                .await;
                match read {
                    Err(ReadError::Server(message))
                        if !self.one_slot && message.starts_with("CROSSSLOT") =>
                    {
                        info!(
                            "redis keeps cluster rules (queues on several slots): \
                             reading one queue per command"
                        );
                        self.one_slot = true;
                    }
                    read => break read?,
                }
            };
            fetched.generation = self.reader.generation();
            let (new, done) =
                reader::split_done(&mut self.reader, &self.keys, &self.queues, entries).await?;
            fetched.new = new;
            fetched.done = done;
        }
        if let Some(limiter) = &self.limiter {
            let own = fetched.own.iter().map(|(queue, entry, _)| (*queue, entry));
            let new = fetched.new.iter().map(|(queue, entry)| (*queue, entry));
            // The batch is ours in Redis now: a failed check must have it
            // taken back (like a read whose reply was lost), not left.
            fetched.admission = limiter
                .admit(&mut self.reader, &self.queues, own.chain(new))
                .await
                .map_err(|error| ReadError::Protocol(format!("checking the limits: {error}")))?;
        }
        Ok(fetched)
    }

    /// Every entry pending for this consumer, with its delivery count.
    async fn own_pending(&mut self) -> Result<Vec<(u16, RawEntry, u64)>, ReadError> {
        let mut after = vec![Bytes::from_static(b"0"); self.queues.len()];
        let mut own = Vec::new();
        loop {
            let page = reader::read_own_pending(
                &mut self.reader,
                &self.queues,
                &self.group,
                &self.consumer,
                OWN_PAGE,
                &mut after,
            )
            .await?;
            note(&mut self.seen, self.reader.generation());
            if page.is_empty() {
                return Ok(own);
            }
            for (index, queue) in self.queues.iter().enumerate() {
                let entries: Vec<RawEntry> = page
                    .iter()
                    .filter(|(at, _)| usize::from(*at) == index)
                    .map(|(_, entry)| entry.clone())
                    .collect();
                let counts =
                    reader::deliveries(&mut self.reader, &queue.stream, &self.group, &entries)
                        .await?;
                own.extend(
                    entries
                        .into_iter()
                        .zip(counts)
                        .map(|(entry, count)| (index as u16, entry, count)),
                );
            }
        }
    }
}

impl Fetcher {
    /// Our pending entries that are not in `held`, claimed (to ourselves)
    /// so that Redis hands back their fields, with their delivery counts.
    async fn own_unheld(
        &mut self,
        held: &HashSet<Bytes>,
    ) -> Result<Vec<(u16, RawEntry, u64)>, ReadError> {
        let mut own = Vec::new();
        for (index, queue) in self.queues.iter().enumerate() {
            let mut after = Bytes::from_static(b"-");
            loop {
                let mut pending = redis::cmd("XPENDING");
                pending
                    .arg(&queue.stream)
                    .arg(&self.group)
                    .arg(after.as_ref())
                    .arg("+")
                    .arg(OWN_PAGE)
                    .arg(&self.consumer);
                let mut replies = self.reader.query(std::slice::from_ref(&pending)).await?;
                let rows = reader::pending_rows(replies.pop());
                let Some((last, _)) = rows.last() else {
                    break;
                };
                after = Bytes::from(format!("({}", String::from_utf8_lossy(last)));
                let full = rows.len() == OWN_PAGE;
                let unheld: Vec<(Bytes, u64)> = rows
                    .into_iter()
                    .filter(|(id, _)| !held.contains(id))
                    .collect();
                if !unheld.is_empty() {
                    let mut claim = redis::cmd("XCLAIM");
                    claim
                        .arg(&queue.stream)
                        .arg(&self.group)
                        .arg(&self.consumer)
                        .arg(0);
                    for (id, _) in &unheld {
                        claim.arg(id.as_ref());
                    }
                    let mut replies = self.reader.query(std::slice::from_ref(&claim)).await?;
                    note(&mut self.seen, self.reader.generation());
                    for entry in replies.pop().map(reply::entries).unwrap_or_default() {
                        let before = unheld
                            .iter()
                            .find(|(id, _)| *id == entry.entry_id)
                            .map_or(0, |(_, count)| *count);
                        own.push((index as u16, entry, before + 1));
                    }
                }
                if !full {
                    break;
                }
            }
        }
        Ok(own)
    }
}

impl FetcherHandle {
    /// Whether a read is outstanding.
    #[must_use]
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Asks for a read; at most one is outstanding. Returns whether it was
    /// sent.
    pub fn request(&mut self, request: ReadRequest) -> bool {
        if self.busy {
            return false;
        }
        self.busy = self.requests.try_send(request).is_ok();
        self.busy
    }

    /// The next read's result (pending forever when none is outstanding).
    pub async fn next(&mut self) -> Result<Fetched, ReadError> {
        if !self.busy {
            return std::future::pending().await;
        }
        let fetched = self.results.recv().await;
        self.busy = false;
        fetched.unwrap_or_else(|| {
            Err(ReadError::Io(std::io::Error::other(
                "the read loop stopped",
            )))
        })
    }

    /// Stops the loop; a read in flight is dropped (what it delivered stays
    /// pending for this consumer in Redis, taken back by its next life or
    /// claimed by another engine).
    pub fn shutdown(self) {
        self.task.abort();
    }
}
