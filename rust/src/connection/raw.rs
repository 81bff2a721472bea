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

use std::collections::HashMap;

use bytes::BytesMut;
use redis::{Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::slots::{self, Address, Redirect, SlotMap};
use super::url::Target;
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

/// One socket to one server, with its read buffer.
struct Node {
    socket: Option<Socket>,
    buffer: BytesMut,
    /// The endpoint's generation when the socket was made.
    generation: u64,
    /// `CLIENT ID` of the socket (for `CLIENT UNBLOCK`; cluster only).
    id: i64,
}

impl Node {
    fn new() -> Self {
        Self {
            socket: None,
            buffer: BytesMut::with_capacity(256 * 1024),
            generation: 0,
            id: 0,
        }
    }

    async fn connect(
        &mut self,
        endpoint: &Endpoint,
        info: &ConnectionInfo,
        name: &str,
    ) -> Result<(), RawError> {
        // The generation the address was looked up at (a change while the
        // socket is made moves it again at the next call).
        let generation = endpoint.generation();
        let mut socket = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Socket::Tcp(tcp(host, *port).await?),
            ConnectionAddr::TcpTls { host, port, .. } => {
                let Some(config) = endpoint.tls.clone() else {
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
        handshake.push(redis::cmd("CLIENT").arg("SETNAME").arg(name).clone());
        if endpoint.is_cluster() {
            handshake.push(redis::cmd("CLIENT").arg("ID").clone());
        }
        let mut packed = Vec::new();
        for cmd in &handshake {
            cmd.write_packed_command(&mut packed);
        }
        socket.write_all(&packed).await?;
        for _ in &handshake {
            match read_frame(&mut socket, &mut self.buffer).await? {
                BytesFrame::Error(message) => return Err(RawError::Server(message.to_string())),
                BytesFrame::Integer(id) => self.id = id,
                _ => {}
            }
        }
        self.socket = Some(socket);
        self.generation = generation;
        Ok(())
    }

    /// Writes `packed` (`count` commands) and reads their `count` replies,
    /// errors included, in order.
    async fn exchange(&mut self, packed: &[u8], count: usize) -> Result<Vec<BytesFrame>, RawError> {
        let Some(socket) = self.socket.as_mut() else {
            return Err(RawError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "not connected",
            )));
        };
        socket.write_all(packed).await?;
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            frames.push(read_frame(socket, &mut self.buffer).await?);
        }
        Ok(frames)
    }
}

/// A cluster's nodes, reached one socket each, and its slot map.
struct Nodes {
    seeds: Vec<ConnectionInfo>,
    map: SlotMap,
    /// The map is stale (a `MOVED` was seen): read it again before the
    /// next query.
    stale: bool,
    main: HashMap<Address, Node>,
    /// Second sockets, for `CLIENT UNBLOCK` while the main one blocks.
    side: HashMap<Address, Node>,
}

/// The first error frame among `frames` as an error, or the frames.
fn replies(frames: Vec<BytesFrame>) -> Result<Vec<BytesFrame>, RawError> {
    let mut failure = None;
    let mut out = Vec::with_capacity(frames.len());
    for frame in frames {
        match frame {
            BytesFrame::Error(message) => {
                failure.get_or_insert(RawError::Server(message.to_string()));
            }
            frame => out.push(frame),
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(out),
    }
}

/// How many rounds of redirections one query follows.
const REDIRECTS: usize = 6;

/// One request/response connection with zero-copy reply decoding. With
/// Redis Cluster, one socket per master: each command goes to the master
/// of its key's slot, the masters' parts of a query are sent at once, and
/// `MOVED` and `ASK` are followed.
pub struct RawConnection {
    endpoint: Endpoint,
    name: String,
    packed: Vec<u8>,
    timeout: Duration,
    single: Node,
    cluster: Option<Nodes>,
}

impl RawConnection {
    pub(super) fn new(endpoint: Endpoint, name: &str, timeout: Duration) -> Self {
        let cluster = match &endpoint.target {
            Target::Cluster(cluster) => Some(Nodes {
                seeds: cluster.seeds.clone(),
                map: SlotMap::default(),
                stale: true,
                main: HashMap::new(),
                side: HashMap::new(),
            }),
            _ => None,
        };
        Self {
            endpoint,
            name: name.replace(' ', "_"),
            packed: Vec::with_capacity(4096),
            timeout,
            single: Node::new(),
            cluster,
        }
    }

    /// Whether this connection serves a Redis Cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The endpoint's generation when the socket that answered last was
    /// made: which master (of those the sentinels named) the replies came
    /// from (always 0 without Sentinel).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.single.generation
    }

    /// Sends `commands` in one write (one per master with Cluster) and
    /// returns their replies in order. A reply that is an error becomes
    /// `RawError::Server`.
    pub async fn query(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, RawError> {
        if self.cluster.is_some() {
            return self.within_timeout(false, commands).await;
        }
        if self.single.socket.is_some() && self.single.generation != self.endpoint.generation() {
            // The sentinels name another master: move to it.
            self.single.socket = None;
        }
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.query_single(commands)).await {
            Ok(Ok(frames)) => Ok(frames),
            Ok(Err(error)) => {
                if !matches!(error, RawError::Server(_)) || error.is_demoted() {
                    self.single.socket = None;
                }
                Err(error)
            }
            Err(_) => {
                self.single.socket = None;
                Err(RawError::Timeout(timeout))
            }
        }
    }

    /// Like `query`, for blocking reads on several masters of a cluster,
    /// one command each: as soon as one brings entries (a reply that is not
    /// nil) the others are unblocked (`CLIENT UNBLOCK`, which makes a read
    /// return nil with nothing delivered), so the read returns at once
    /// without dropping replies. A redirected read comes back nil (the map
    /// is read again for the next one). Without Cluster, it is `query`.
    pub async fn query_blocking(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, RawError> {
        if self.cluster.is_none() {
            return self.query(commands).await;
        }
        self.within_timeout(true, commands).await
    }

    async fn within_timeout(
        &mut self,
        blocking: bool,
        commands: &[Cmd],
    ) -> Result<Vec<BytesFrame>, RawError> {
        let timeout = self.timeout;
        let run = async {
            if blocking {
                self.blocking_cluster(commands).await
            } else {
                self.query_cluster(commands).await
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => {
                // The sockets taken out for the query were dropped with it.
                Err(RawError::Timeout(timeout))
            }
        }
    }

    async fn query_single(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, RawError> {
        if self.single.socket.is_none() {
            let info = self
                .endpoint
                .master()
                .await
                .map_err(|error| RawError::Io(io::Error::other(error.to_string())))?;
            self.single
                .connect(&self.endpoint, &info, &self.name)
                .await?;
        }
        self.packed.clear();
        for cmd in commands {
            cmd.write_packed_command(&mut self.packed);
        }
        // Every reply is read, so the connection stays usable after an error.
        replies(self.single.exchange(&self.packed, commands.len()).await?)
    }
}

/// The cluster mode.
impl RawConnection {
    fn nodes(&mut self) -> &mut Nodes {
        match self.cluster.as_mut() {
            Some(nodes) => nodes,
            None => unreachable!("cluster mode only"),
        }
    }

    /// How to reach the master at `address` (the seeds' user and password).
    fn info_for(&mut self, address: &Address) -> ConnectionInfo {
        let nodes = self.nodes();
        let settings = nodes
            .seeds
            .first()
            .map(|seed| seed.redis_settings().clone())
            .unwrap_or_default();
        // Cluster URLs are plain TCP (see `url`).
        let addr = ConnectionAddr::Tcp(address.0.clone(), address.1);
        match addr.into_connection_info() {
            Ok(info) => info.set_redis_settings(settings),
            Err(_) => unreachable!("an address is a connection info"),
        }
    }

    /// A connected socket to `address`, taken out of `main` (or `side`).
    async fn take(&mut self, address: &Address, side: bool) -> Result<Node, RawError> {
        let nodes = self.nodes();
        let pool = if side {
            &mut nodes.side
        } else {
            &mut nodes.main
        };
        let mut node = pool.remove(address).unwrap_or_else(Node::new);
        if node.socket.is_none() {
            let info = self.info_for(address);
            let name = self.name.clone();
            node.connect(&self.endpoint, &info, &name).await?;
        }
        Ok(node)
    }

    fn give_back(&mut self, address: Address, node: Node, side: bool) {
        let nodes = self.nodes();
        let pool = if side {
            &mut nodes.side
        } else {
            &mut nodes.main
        };
        if node.socket.is_some() {
            pool.insert(address, node);
        }
    }

    /// Reads the slot map from the first node that answers (the known
    /// masters, then the seeds).
    async fn refresh(&mut self) -> Result<(), RawError> {
        let nodes = self.nodes();
        let mut candidates = nodes.map.masters();
        for seed in &nodes.seeds {
            if let ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } =
                seed.addr()
            {
                candidates.push((host.clone(), *port));
            }
        }
        let mut last = RawError::Io(io::Error::other("no cluster node to ask for its slots"));
        let mut ask = Vec::new();
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .write_packed_command(&mut ask);
        for address in candidates {
            let mut node = match self.take(&address, true).await {
                Ok(node) => node,
                Err(error) => {
                    last = error;
                    continue;
                }
            };
            match node.exchange(&ask, 1).await {
                Ok(mut frames) => {
                    self.give_back(address.clone(), node, true);
                    match frames.pop() {
                        Some(BytesFrame::Error(message)) => {
                            last = RawError::Server(message.to_string());
                        }
                        Some(reply) => {
                            let map = SlotMap::from_reply(&reply, &address.0);
                            if !map.is_empty() {
                                let nodes = self.nodes();
                                nodes.map = map;
                                nodes.stale = false;
                                return Ok(());
                            }
                            last = RawError::Protocol("CLUSTER SLOTS named no master".into());
                        }
                        None => {}
                    }
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// Where each command goes: the master of its key's slot.
    async fn targets(&mut self, commands: &[Cmd]) -> Result<Vec<Address>, RawError> {
        self.fresh_map().await?;
        let nodes = self.nodes();
        // A command with no key (`SCRIPT LOAD` before the `EVALSHA` that
        // needs it) goes where the query's first keyed command goes.
        let any = commands
            .iter()
            .find_map(slots::command_slot)
            .and_then(|slot| nodes.map.master(slot).cloned())
            .or_else(|| nodes.map.masters().into_iter().next());
        commands
            .iter()
            .map(|cmd| {
                let address = match slots::command_slot(cmd) {
                    Some(slot) => nodes.map.master(slot).cloned(),
                    None => any.clone(),
                };
                address.ok_or_else(|| RawError::Protocol("a slot no master serves".into()))
            })
            .collect()
    }

    /// The master that serves `key`'s slot now.
    pub async fn master_of(&mut self, key: &[u8]) -> Result<Option<Address>, RawError> {
        if self.cluster.is_none() {
            return Ok(None);
        }
        self.fresh_map().await?;
        Ok(self.nodes().map.master(slots::key_slot(key)).cloned())
    }

    /// Reads the slot map first when it is missing or stale.
    async fn fresh_map(&mut self) -> Result<(), RawError> {
        if self.nodes().stale || self.nodes().map.is_empty() {
            self.refresh().await?;
        }
        Ok(())
    }

    /// Commands `todo` (indices into `commands`, each with its master and
    /// whether `ASKING` goes first) grouped by master, their sockets taken
    /// out and their commands packed.
    async fn groups(
        &mut self,
        commands: &[Cmd],
        todo: &[(usize, Address, bool)],
    ) -> Result<Vec<Group>, RawError> {
        let mut groups: Vec<Group> = Vec::new();
        for (index, address, asking) in todo {
            let known = groups.iter().position(|group| &group.address == address);
            let at = if let Some(at) = known {
                at
            } else {
                let node = self.take(address, false).await?;
                groups.push(Group {
                    address: address.clone(),
                    node,
                    packed: Vec::new(),
                    wanted: Vec::new(),
                    frames: 0,
                });
                groups.len() - 1
            };
            let group = &mut groups[at];
            if *asking {
                redis::cmd("ASKING").write_packed_command(&mut group.packed);
                group.frames += 1;
            }
            commands[*index].write_packed_command(&mut group.packed);
            group.frames += 1;
            group.wanted.push((*index, *asking));
        }
        Ok(groups)
    }

    async fn query_cluster(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, RawError> {
        let targets = self.targets(commands).await?;
        let mut todo: Vec<(usize, Address, bool)> = targets
            .into_iter()
            .enumerate()
            .map(|(index, address)| (index, address, false))
            .collect();
        let mut out: Vec<Option<BytesFrame>> = vec![None; commands.len()];
        for round in 0..REDIRECTS {
            if todo.is_empty() {
                break;
            }
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(20 * round as u64)).await;
            }
            let mut groups = self.groups(commands, &todo).await?;
            let results = futures_util::future::join_all(
                groups
                    .iter_mut()
                    .map(|group| group.node.exchange(&group.packed, group.frames)),
            )
            .await;
            todo.clear();
            let mut failure = None;
            for (group, result) in groups.into_iter().zip(results) {
                match result {
                    Ok(frames) => {
                        self.sort_replies(&group, frames, &mut out, &mut todo);
                        self.give_back(group.address, group.node, false);
                    }
                    Err(error) => failure = Some(error),
                }
            }
            if let Some(error) = failure {
                return Err(error);
            }
        }
        if !todo.is_empty() {
            return Err(RawError::Server(format!(
                "TRYAGAIN still redirected after {REDIRECTS} rounds"
            )));
        }
        replies(
            out.into_iter()
                .map(|frame| frame.unwrap_or(BytesFrame::Null))
                .collect(),
        )
    }

    /// Puts `group`'s replies in `out`; redirected commands go to `todo`.
    fn sort_replies(
        &mut self,
        group: &Group,
        frames: Vec<BytesFrame>,
        out: &mut [Option<BytesFrame>],
        todo: &mut Vec<(usize, Address, bool)>,
    ) {
        let mut frames = frames.into_iter();
        for (index, asking) in &group.wanted {
            if *asking {
                frames.next();
            }
            let Some(frame) = frames.next() else {
                break;
            };
            let redirect = match &frame {
                BytesFrame::Error(message) => Redirect::parse(message),
                _ => None,
            };
            match redirect {
                Some(Redirect::Moved(slot, address)) => {
                    let nodes = self.nodes();
                    nodes.map.moved(slot, address.clone());
                    nodes.stale = true;
                    todo.push((*index, address, false));
                }
                Some(Redirect::Ask(_, address)) => todo.push((*index, address, true)),
                Some(Redirect::Retry) => todo.push((*index, group.address.clone(), *asking)),
                None => out[*index] = Some(frame),
            }
        }
    }

    async fn blocking_cluster(&mut self, commands: &[Cmd]) -> Result<Vec<BytesFrame>, RawError> {
        let targets = self.targets(commands).await?;
        let todo: Vec<(usize, Address, bool)> = targets
            .into_iter()
            .enumerate()
            .map(|(index, address)| (index, address, false))
            .collect();
        let mut groups = self.groups(commands, &todo).await?;
        let ids: Vec<(Address, i64)> = groups
            .iter()
            .map(|group| (group.address.clone(), group.node.id))
            .collect();
        let mut results: Vec<Option<Result<Vec<BytesFrame>, RawError>>> =
            (0..groups.len()).map(|_| None).collect();
        {
            let mut running: futures_util::stream::FuturesUnordered<_> = groups
                .iter_mut()
                .enumerate()
                .map(|(at, group)| async move {
                    (at, group.node.exchange(&group.packed, group.frames).await)
                })
                .collect();
            let mut unblocked = false;
            while let Some((at, result)) = futures_util::StreamExt::next(&mut running).await {
                let brought = match &result {
                    Ok(frames) => frames.iter().any(|frame| !is_nil(frame)),
                    Err(_) => true,
                };
                results[at] = Some(result);
                if brought && !unblocked {
                    unblocked = true;
                    let others: Vec<(Address, i64)> = ids
                        .iter()
                        .enumerate()
                        .filter(|(other, _)| results[*other].is_none())
                        .map(|(_, id)| id.clone())
                        .collect();
                    self.unblock(&others).await;
                }
            }
        }
        let mut out: Vec<Option<BytesFrame>> = vec![None; commands.len()];
        let mut failure = None;
        for (group, result) in groups.into_iter().zip(results) {
            match result {
                Some(Ok(frames)) => {
                    let mut redirected = Vec::new();
                    self.sort_replies(&group, frames, &mut out, &mut redirected);
                    if !redirected.is_empty() {
                        self.nodes().stale = true;
                    }
                    self.give_back(group.address, group.node, false);
                }
                Some(Err(error)) => failure = Some(error),
                None => {}
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        replies(
            out.into_iter()
                .map(|frame| frame.unwrap_or(BytesFrame::Null))
                .collect(),
        )
    }

    /// Unblocks the reads of the sockets `ids` (best effort: a read not
    /// unblocked returns by its own timeout).
    async fn unblock(&mut self, ids: &[(Address, i64)]) {
        for (address, id) in ids {
            let Ok(mut node) = self.take(address, true).await else {
                continue;
            };
            let mut packed = Vec::new();
            redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(*id)
                .write_packed_command(&mut packed);
            if node.exchange(&packed, 1).await.is_ok() {
                self.give_back(address.clone(), node, true);
            }
        }
    }
}

/// Whether a read's reply is nil (nothing read).
fn is_nil(frame: &BytesFrame) -> bool {
    match frame {
        BytesFrame::Null => true,
        BytesFrame::Array(items) => items.is_empty(),
        _ => false,
    }
}

/// One master's part of a cluster query.
struct Group {
    address: Address,
    node: Node,
    packed: Vec<u8>,
    /// The commands sent (index, whether `ASKING` went first).
    wanted: Vec<(usize, bool)>,
    /// Replies to read.
    frames: usize,
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
