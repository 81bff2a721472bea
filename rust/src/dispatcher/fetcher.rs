//! The read loop: one outstanding read at a time on the dispatcher's read
//! connection. The event loop asks for a read when actors have room
//! (`request`), and gets what it brought on `results`.
//!
//! A read may first re-read this consumer's own pending entries (at start,
//! and after a reply was lost: a read that ran without its reply reaching us
//! made entries ours that we never saw), with their delivery counts, then
//! takes new entries (`XREADGROUP >`), and sets aside those whose task id is
//! already done.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use bytes::Bytes;
use std::sync::Arc;

use crate::envelope::RawEntry;
use crate::keys::Keys;
use crate::streams::reader::{self, ReadError, Reader};
use crate::streams::QueueSpec;

/// Own pending entries per page when re-reading them.
const OWN_PAGE: usize = 500;

/// One read to make.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    /// Most new entries to take (0: none, only the re-read).
    pub count: usize,
    /// How long to block when nothing is there, ms (0 = do not block).
    pub block_ms: u64,
    /// Re-read our own pending entries first.
    pub recover: bool,
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
            while let Some(request) = incoming.recv().await {
                let fetched = reading.fetch(request).await;
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

    async fn fetch(&mut self, request: ReadRequest) -> Result<Fetched, ReadError> {
        let mut fetched = Fetched::default();
        if request.recover {
            fetched.own = self.own_pending().await?;
        }
        if request.count > 0 {
            let entries = reader::read_new(
                &mut self.reader,
                &self.queues,
                &self.group,
                &self.consumer,
                request.count,
                request.block_ms,
            )
            .await?;
            let (new, done) =
                reader::split_done(&mut self.reader, &self.keys, &self.queues, entries).await?;
            fetched.new = new;
            fetched.done = done;
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

impl FetcherHandle {
    /// Whether a read is outstanding.
    #[must_use]
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Asks for a read; at most one is outstanding.
    pub fn request(&mut self, request: ReadRequest) {
        if self.busy {
            return;
        }
        self.busy = self.requests.try_send(request).is_ok();
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
