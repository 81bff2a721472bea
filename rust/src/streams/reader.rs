//! The dispatcher's read connection, the hot path.
//!
//! Profiling showed redis-rs's reply parser and the allocations of its `Value`
//! tree (about 16 per task entry) costing the dispatcher more than all the rest
//! of its work together. This connection keeps redis-rs for what it does well
//! (URL parsing, command packing) and decodes replies with `redis-protocol`,
//! whose `BytesFrame`s are views into one read buffer: no copy per field.
//!
//! It is strictly request/response (one batch of commands at a time), which
//! is all the reader needs. Any error drops the socket; the next call
//! reconnects.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use redis::{Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::{reply, QueueSpec};
use crate::envelope::RawEntry;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// No complete reply within the response timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error.
    #[error("{0}")]
    Server(String),
    /// The reply could not be decoded.
    #[error("bad reply: {0}")]
    Protocol(String),
    /// The URL cannot be served by this connection.
    #[error("{0}")]
    Config(String),
}

impl ReadError {
    /// Whether Redis said the consumer group (or its stream) does not exist.
    #[must_use]
    pub fn is_missing_group(&self) -> bool {
        matches!(self, Self::Server(message) if message.starts_with("NOGROUP"))
    }

    /// Whether the command may have run without its reply reaching us (the
    /// connection broke or timed out): a read may have delivered entries
    /// that we never saw.
    #[must_use]
    pub fn reply_may_be_lost(&self) -> bool {
        matches!(self, Self::Io(_) | Self::Timeout(_) | Self::Protocol(_))
    }
}

enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(stream) => stream.write_all(bytes).await,
            Self::Unix(stream) => stream.write_all(bytes).await,
        }
    }

    async fn read_buf(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        match self {
            Self::Tcp(stream) => stream.read_buf(buffer).await,
            Self::Unix(stream) => stream.read_buf(buffer).await,
        }
    }
}

/// One request/response connection with zero-copy reply decoding.
pub struct Reader {
    info: ConnectionInfo,
    name: String,
    socket: Option<Socket>,
    buffer: BytesMut,
    packed: Vec<u8>,
    timeout: Duration,
}

impl Reader {
    /// A reader for `url`; connects on first use and names its connection
    /// `name` (`CLIENT SETNAME`, shown by `CLIENT LIST`).
    pub fn new(url: &str, timeout: Duration, name: &str) -> Result<Self, ReadError> {
        let info = url
            .into_connection_info()
            .map_err(|error| ReadError::Config(format!("bad redis URL: {error}")))?;
        if !matches!(
            info.addr(),
            ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_)
        ) {
            return Err(ReadError::Config(
                "TLS connections (rediss://) are not supported yet".to_owned(),
            ));
        }
        Ok(Self {
            info,
            name: name.replace(' ', "_"),
            socket: None,
            buffer: BytesMut::with_capacity(256 * 1024),
            packed: Vec::with_capacity(4096),
            timeout,
        })
    }

    async fn connect(&mut self) -> Result<(), ReadError> {
        let mut socket = match self.info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Socket::Tcp(stream)
            }
            ConnectionAddr::Unix(path) => Socket::Unix(UnixStream::connect(path).await?),
            _ => return Err(ReadError::Config("TLS is not supported".to_owned())),
        };
        self.buffer.clear();
        let settings = self.info.redis_settings();
        let mut handshake = Vec::new();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            handshake.push(auth);
        }
        if settings.db() != 0 {
            handshake.push(redis::cmd("SELECT").arg(settings.db()).clone());
        }
        handshake.push(redis::cmd("CLIENT").arg("SETNAME").arg(&self.name).clone());
        {
            let mut packed = Vec::new();
            for cmd in &handshake {
                cmd.write_packed_command(&mut packed);
            }
            socket.write_all(&packed).await?;
            for _ in &handshake {
                let frame = read_frame(&mut socket, &mut self.buffer).await?;
                if let BytesFrame::Error(message) = frame {
                    return Err(ReadError::Server(message.to_string()));
                }
            }
        }
        self.socket = Some(socket);
        Ok(())
    }

    /// Sends `commands` in one write and returns their replies in order.
    /// A reply that is an error becomes `ReadError::Server`.
    pub async fn query(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, ReadError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.query_inner(commands)).await {
            Ok(Ok(frames)) => Ok(frames),
            Ok(Err(error)) => {
                if !matches!(error, ReadError::Server(_)) {
                    self.socket = None;
                }
                Err(error)
            }
            Err(_) => {
                self.socket = None;
                Err(ReadError::Timeout(timeout))
            }
        }
    }

    async fn query_inner(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, ReadError> {
        if self.socket.is_none() {
            self.connect().await?;
        }
        let Some(socket) = self.socket.as_mut() else {
            return Err(ReadError::Config("not connected".to_owned()));
        };
        self.packed.clear();
        for cmd in commands {
            cmd.write_packed_command(&mut self.packed);
        }
        socket.write_all(&self.packed).await?;
        let mut frames = Vec::with_capacity(commands.len());
        let mut failure = None;
        for _ in commands {
            match read_frame(socket, &mut self.buffer).await? {
                BytesFrame::Error(message) => {
                    failure = Some(ReadError::Server(message.to_string()));
                }
                frame => frames.push(frame),
            }
        }
        // Every reply was read, so the connection stays usable after an error.
        match failure {
            Some(error) => Err(error),
            None => Ok(frames),
        }
    }
}

async fn read_frame(socket: &mut Socket, buffer: &mut BytesMut) -> Result<BytesFrame, ReadError> {
    loop {
        if !buffer.is_empty() {
            match decode_bytes_mut(buffer) {
                Ok(Some((frame, _, _))) => return Ok(frame),
                Ok(None) => {}
                Err(error) => return Err(ReadError::Protocol(error.to_string())),
            }
        }
        if buffer.capacity() - buffer.len() < 64 * 1024 {
            buffer.reserve(256 * 1024);
        }
        if socket.read_buf(buffer).await? == 0 {
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            )));
        }
    }
}

fn xreadgroup(group: &str, consumer: &str, count: usize, block_ms: Option<u64>) -> Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(block) = block_ms {
        cmd.arg("BLOCK").arg(block);
    }
    cmd.arg("STREAMS");
    cmd
}

/// Reads up to `count` new entries across `queues`, at most one round trip
/// when work is there. With several queues, each gets a share of `count` by
/// weight (one pipelined non-blocking read); only when all are empty does it
/// block on all of them at once for up to `block_ms` (0 = do not block).
pub async fn read_new(
    reader: &mut Reader,
    queues: &[QueueSpec],
    group: &str,
    consumer: &str,
    count: usize,
    block_ms: u64,
) -> Result<Vec<(u16, RawEntry)>, ReadError> {
    let tag = |entries: Vec<(bytes::Bytes, RawEntry)>| -> Vec<(u16, RawEntry)> {
        entries
            .into_iter()
            .filter_map(|(key, entry)| {
                let index = queues
                    .iter()
                    .position(|queue| queue.stream.as_bytes() == key.as_ref())?;
                Some((index as u16, entry))
            })
            .collect()
    };
    if queues.len() > 1 {
        let total: u64 = queues.iter().map(|queue| u64::from(queue.weight)).sum();
        let commands: Vec<Cmd> = queues
            .iter()
            .map(|queue| {
                let share =
                    (count as u64 * u64::from(queue.weight)).div_ceil(total.max(1)) as usize;
                let mut cmd = xreadgroup(group, consumer, share.max(1), None);
                cmd.arg(&queue.stream).arg(">");
                cmd
            })
            .collect();
        let replies = reader.query(&commands).await?;
        let entries: Vec<_> = replies.into_iter().flat_map(reply::read_reply).collect();
        if !entries.is_empty() || block_ms == 0 {
            return Ok(tag(entries));
        }
    }
    let mut cmd = xreadgroup(group, consumer, count, (block_ms > 0).then_some(block_ms));
    for queue in queues {
        cmd.arg(&queue.stream);
    }
    for _ in queues {
        cmd.arg(">");
    }
    let mut replies = reader.query(std::slice::from_ref(&cmd)).await?;
    Ok(tag(replies
        .pop()
        .map(reply::read_reply)
        .unwrap_or_default()))
}

/// Reads a page of this consumer's own pending entries (left by an earlier
/// life of the same consumer name), after `after[i]` in each queue; advances
/// `after`. Entries deleted meanwhile come back with no fields.
pub async fn read_own_pending(
    reader: &mut Reader,
    queues: &[QueueSpec],
    group: &str,
    consumer: &str,
    count: usize,
    after: &mut [bytes::Bytes],
) -> Result<Vec<(u16, RawEntry)>, ReadError> {
    let mut cmd = xreadgroup(group, consumer, count, None);
    for queue in queues {
        cmd.arg(&queue.stream);
    }
    for id in after.iter() {
        cmd.arg(id.as_ref());
    }
    let mut replies = reader.query(std::slice::from_ref(&cmd)).await?;
    let mut out = Vec::new();
    for (key, entry) in replies.pop().map(reply::read_reply).unwrap_or_default() {
        if let Some(index) = queues
            .iter()
            .position(|queue| queue.stream.as_bytes() == key.as_ref())
        {
            after[index] = entry.entry_id.clone();
            out.push((index as u16, entry));
        }
    }
    Ok(out)
}

/// Splits `entries` into those to run and those whose task id already has a
/// done marker (idempotent tasks that completed within `processed_ttl`).
/// Costs a round trip only when some entry is idempotent.
pub async fn split_done(
    reader: &mut Reader,
    keys: &crate::keys::Keys,
    queues: &[QueueSpec],
    entries: Vec<(u16, RawEntry)>,
) -> Result<(Vec<(u16, RawEntry)>, Vec<(u16, RawEntry)>), ReadError> {
    use crate::envelope::field;
    let checks: Vec<(usize, Cmd)> = entries
        .iter()
        .enumerate()
        .filter(|(_, (_, entry))| entry.get(field::IDEMPOTENT) == Some(b"1"))
        .filter_map(|(position, (queue, entry))| {
            let id = String::from_utf8_lossy(entry.get(field::ID)?).into_owned();
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(keys.done(&queues[*queue as usize].name, &id));
            Some((position, cmd))
        })
        .collect();
    if checks.is_empty() {
        return Ok((entries, Vec::new()));
    }
    let commands: Vec<Cmd> = checks.iter().map(|(_, cmd)| cmd.clone()).collect();
    let replies = reader.query(&commands).await?;
    let mut done = vec![false; entries.len()];
    for ((position, _), reply) in checks.iter().zip(replies) {
        done[*position] = matches!(reply, BytesFrame::Integer(count) if count > 0);
    }
    let mut run = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for (entry, is_done) in entries.into_iter().zip(done) {
        if is_done {
            skipped.push(entry);
        } else {
            run.push(entry);
        }
    }
    Ok((run, skipped))
}
