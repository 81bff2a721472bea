//! Every connection to Redis is built here, from its URL: the client's
//! synchronous connection, the dispatcher's reconnecting async connection
//! (redis-rs `ConnectionManager`) and its zero-copy read connections.
//! TLS, Sentinel and Cluster connections belong here too.
//!
//! The zero-copy [`RawConnection`]: profiling showed redis-rs's reply parser
//! and the allocations of its `Value` tree (about 16 per task entry) costing
//! the dispatcher more than all the rest of its work together. This
//! connection keeps redis-rs for what it does well (URL parsing, command
//! packing) and decodes replies with `redis-protocol`, whose `BytesFrame`s
//! are views into one read buffer: no copy per field. It is strictly
//! request/response (one batch of commands at a time). Any error drops the
//! socket; the next call reconnects.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisResult};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// How long making a TCP connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad redis URL: {0}")]
pub struct UrlError(pub String);

/// A parsed Redis URL, from which every connection is made.
#[derive(Debug, Clone)]
pub struct Endpoint {
    info: ConnectionInfo,
}

impl Endpoint {
    /// Parses `url` (`redis://`, `unix://`).
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let info = url
            .into_connection_info()
            .map_err(|error| UrlError(error.to_string()))?;
        if !matches!(
            info.addr(),
            ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_)
        ) {
            return Err(UrlError(
                "TLS connections (rediss://) are not supported by this build yet".to_owned(),
            ));
        }
        Ok(Self { info })
    }

    /// A redis-rs client (for synchronous connections).
    pub fn client(&self) -> RedisResult<redis::Client> {
        redis::Client::open(self.info.clone())
    }

    /// A synchronous connection whose every call times out after `timeout`.
    pub fn connect_sync(&self, timeout: Duration) -> RedisResult<redis::Connection> {
        let connection = self.client()?.get_connection_with_timeout(timeout)?;
        connection.set_read_timeout(Some(timeout))?;
        connection.set_write_timeout(Some(timeout))?;
        Ok(connection)
    }

    /// The dispatcher's async connection, reconnecting by itself; a reply
    /// not in within `response_timeout` fails the call.
    pub async fn connect_managed(
        &self,
        response_timeout: Duration,
    ) -> RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_with_config(self.client()?, config).await
    }

    /// A zero-copy read connection named `name` (`CLIENT SETNAME`, shown by
    /// `CLIENT LIST`); connects on first use. A reply not in within
    /// `timeout` fails the call.
    #[must_use]
    pub fn raw(&self, name: &str, timeout: Duration) -> RawConnection {
        RawConnection {
            info: self.info.clone(),
            name: name.replace(' ', "_"),
            socket: None,
            buffer: BytesMut::with_capacity(256 * 1024),
            packed: Vec::with_capacity(4096),
            timeout,
        }
    }
}

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
pub struct RawConnection {
    info: ConnectionInfo,
    name: String,
    socket: Option<Socket>,
    buffer: BytesMut,
    packed: Vec<u8>,
    timeout: Duration,
}

impl RawConnection {
    async fn connect(&mut self) -> Result<(), RawError> {
        let mut socket = match self.info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let connect = TcpStream::connect((host.as_str(), *port));
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| RawError::Timeout(CONNECT_TIMEOUT))??;
                stream.set_nodelay(true)?;
                Socket::Tcp(stream)
            }
            ConnectionAddr::Unix(path) => Socket::Unix(UnixStream::connect(path).await?),
            _ => {
                return Err(RawError::Io(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "TLS is not supported by this build yet",
                )))
            }
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
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.query_inner(commands)).await {
            Ok(Ok(frames)) => Ok(frames),
            Ok(Err(error)) => {
                if !matches!(error, RawError::Server(_)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_when_parsed() {
        assert!(Endpoint::parse("redis://127.0.0.1:6379/0").is_ok());
        assert!(Endpoint::parse("unix:///tmp/redis.sock").is_ok());
        assert!(Endpoint::parse("nonsense://x").is_err());
    }
}
