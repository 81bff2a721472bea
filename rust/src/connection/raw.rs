//! The zero-copy [`RawConnection`]: profiling showed redis-rs's reply parser
//! and the allocations of its `Value` tree (about 16 per task entry) costing
//! the dispatcher more than all the rest of its work together. This
//! connection keeps redis-rs for what it does well (URL parsing, command
//! packing) and decodes replies with `redis-protocol`, whose `BytesFrame`s
//! are views into one read buffer: no copy per field. It is strictly
//! request/response (one batch of commands at a time). Any error drops the
//! socket; the next call reconnects (asking the sentinels again, if any).

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use redis::{Cmd, ConnectionAddr};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{tls, Endpoint, CONNECT_TIMEOUT};

/// Why a call on a [`RawConnection`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
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
}

impl RawError {
    /// Whether Redis said the consumer group (or its stream) does not exist.
    #[must_use]
    pub fn is_missing_group(&self) -> bool {
        matches!(self, Self::Server(message) if message.starts_with("NOGROUP"))
    }

    /// Whether the node is no longer the master (after a failover): the
    /// connection is dropped, so the next call finds the master again.
    #[must_use]
    pub fn is_demoted(&self) -> bool {
        matches!(self, Self::Server(message)
            if super::DEMOTED.iter().any(|code| message.split(' ').next() == Some(*code)))
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
    Tls(Box<TlsStream<TcpStream>>),
}

impl Socket {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(stream) => stream.write_all(bytes).await,
            Self::Unix(stream) => stream.write_all(bytes).await,
            Self::Tls(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
        }
    }

    async fn read_buf(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        match self {
            Self::Tcp(stream) => stream.read_buf(buffer).await,
            Self::Unix(stream) => stream.read_buf(buffer).await,
            Self::Tls(stream) => stream.read_buf(buffer).await,
        }
    }
}

async fn tcp(host: &str, port: u16) -> Result<TcpStream, RawError> {
    let connect = TcpStream::connect((host, port));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| RawError::Timeout(CONNECT_TIMEOUT))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request/response connection with zero-copy reply decoding.
pub struct RawConnection {
    endpoint: Endpoint,
    name: String,
    socket: Option<Socket>,
    buffer: BytesMut,
    packed: Vec<u8>,
    timeout: Duration,
    /// The endpoint's generation when the socket was made.
    generation: u64,
}

impl RawConnection {
    pub(super) fn new(endpoint: Endpoint, name: &str, timeout: Duration) -> Self {
        Self {
            endpoint,
            name: name.replace(' ', "_"),
            socket: None,
            buffer: BytesMut::with_capacity(256 * 1024),
            packed: Vec::with_capacity(4096),
            timeout,
            generation: 0,
        }
    }

    async fn connect(&mut self) -> Result<(), RawError> {
        let info = self
            .endpoint
            .master()
            .await
            .map_err(|error| RawError::Io(io::Error::other(error.to_string())))?;
        self.generation = self.endpoint.generation();
        let mut socket = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Socket::Tcp(tcp(host, *port).await?),
            ConnectionAddr::TcpTls { host, port, .. } => {
                let Some(config) = self.endpoint.tls.clone() else {
                    return Err(RawError::Io(io::Error::other("TLS without its settings")));
                };
                let name = tls::server_name(host).map_err(io::Error::other)?;
                let stream = tcp(host, *port).await?;
                let handshake = TlsConnector::from(config).connect(name, stream);
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
                    .await
                    .map_err(|_| RawError::Timeout(CONNECT_TIMEOUT))?
                    .map_err(|error| {
                        RawError::Io(io::Error::other(format!("TLS handshake: {error}")))
                    })?;
                Socket::Tls(Box::new(stream))
            }
            ConnectionAddr::Unix(path) => Socket::Unix(UnixStream::connect(path).await?),
            other => {
                return Err(RawError::Io(io::Error::other(format!(
                    "unsupported address {other}"
                ))))
            }
        };
        self.buffer.clear();
        let settings = info.redis_settings();
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
        let mut packed = Vec::new();
        for cmd in &handshake {
            cmd.write_packed_command(&mut packed);
        }
        socket.write_all(&packed).await?;
        for _ in &handshake {
            let frame = read_frame(&mut socket, &mut self.buffer).await?;
            if let BytesFrame::Error(message) = frame {
                return Err(RawError::Server(message.to_string()));
            }
        }
        self.socket = Some(socket);
        Ok(())
    }

    /// Sends `commands` in one write and returns their replies in order.
    /// A reply that is an error becomes `RawError::Server`.
    pub async fn query(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, RawError> {
        if self.socket.is_some() && self.generation != self.endpoint.generation() {
            // The sentinels name another master: move to it.
            self.socket = None;
        }
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.query_inner(commands)).await {
            Ok(Ok(frames)) => Ok(frames),
            Ok(Err(error)) => {
                if !matches!(error, RawError::Server(_)) || error.is_demoted() {
                    self.socket = None;
                }
                Err(error)
            }
            Err(_) => {
                self.socket = None;
                Err(RawError::Timeout(timeout))
            }
        }
    }

    async fn query_inner(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, RawError> {
        if self.socket.is_none() {
            self.connect().await?;
        }
        let Some(socket) = self.socket.as_mut() else {
            return Err(RawError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "not connected",
            )));
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
                    failure = Some(RawError::Server(message.to_string()));
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

async fn read_frame(socket: &mut Socket, buffer: &mut BytesMut) -> Result<BytesFrame, RawError> {
    loop {
        if !buffer.is_empty() {
            match decode_bytes_mut(buffer) {
                Ok(Some((frame, _, _))) => return Ok(frame),
                Ok(None) => {}
                Err(error) => return Err(RawError::Protocol(error.to_string())),
            }
        }
        if buffer.capacity() - buffer.len() < 64 * 1024 {
            buffer.reserve(256 * 1024);
        }
        if socket.read_buf(buffer).await? == 0 {
            return Err(RawError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            )));
        }
    }
}
