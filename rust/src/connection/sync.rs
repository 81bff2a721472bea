//! The client's synchronous connection: to one server, or to a cluster
//! (redis-rs's cluster connection, which routes each command and pipeline
//! by its first key and follows `MOVED` and `ASK`).
//!
//! A cluster pipeline goes to the master of its first key: every command
//! in it must sit on that slot. [`SyncConnection::query_split`] splits a
//! pipeline that does not (one pipeline per slot), puts the replies back
//! in order, and follows the redirections of its commands.

use std::collections::HashMap;
use std::time::Duration;

use redis::{
    Cmd, ConnectionAddr, ConnectionLike, IntoConnectionInfo, Pipeline, RedisConnectionInfo,
    RedisResult, Value,
};

use super::slots::{self, Address, Redirect, SlotMap};

/// A synchronous connection.
pub enum SyncConnection {
    /// One server (or the master that Sentinel names).
    One(redis::Connection),
    /// Redis Cluster.
    Cluster(Box<ClusterSync>),
}

/// A cluster: redis-rs's connection for lone commands and scripts (routed,
/// redirected and retried by redis-rs), and a socket per master with the
/// slot map for pipelines. redis-rs sends a redirected pipeline again as a
/// whole, with `ASKING` before its first command only, so commands before
/// the redirected one could run twice; here each redirected command is sent
/// again alone, where the redirection says.
pub struct ClusterSync {
    cluster: redis::cluster::ClusterConnection,
    settings: RedisConnectionInfo,
    /// The first seed's host, for a node that names no address of its own.
    host: String,
    timeout: Duration,
    map: SlotMap,
    nodes: HashMap<Address, redis::Connection>,
}

/// How many redirections one command follows.
const REDIRECTS: u64 = 6;

impl ClusterSync {
    /// Wraps redis-rs's cluster connection; the first seed's user and
    /// password, and `timeout`, serve the sockets to each master.
    pub fn new(
        cluster: redis::cluster::ClusterConnection,
        seed: Option<&redis::ConnectionInfo>,
        timeout: Duration,
    ) -> Self {
        let host = match seed.map(redis::ConnectionInfo::addr) {
            Some(ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. }) => {
                host.clone()
            }
            _ => "127.0.0.1".to_owned(),
        };
        Self {
            cluster,
            settings: seed
                .map(|seed| seed.redis_settings().clone())
                .unwrap_or_default(),
            host,
            timeout,
            map: SlotMap::default(),
            nodes: HashMap::new(),
        }
    }

    fn refresh(&mut self) -> RedisResult<()> {
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.cluster)?;
        self.map = SlotMap::from_value(&reply, &self.host);
        Ok(())
    }

    fn node(&mut self, address: &Address) -> RedisResult<&mut redis::Connection> {
        if !self.nodes.contains_key(address) {
            let info = ConnectionAddr::Tcp(address.0.clone(), address.1)
                .into_connection_info()?
                .set_redis_settings(self.settings.clone());
            let connection = redis::Client::open(info)?
                .get_connection_with_timeout(self.timeout.min(super::CONNECT_TIMEOUT))?;
            connection.set_read_timeout(Some(self.timeout))?;
            connection.set_write_timeout(Some(self.timeout))?;
            self.nodes.insert(address.clone(), connection);
        }
        match self.nodes.get_mut(address) {
            Some(connection) => Ok(connection),
            None => unreachable!("inserted above"),
        }
    }

    /// Sends `pipeline` (not a transaction) to `address` and returns every
    /// reply, refusals in place; a broken socket is dropped.
    fn send(&mut self, address: &Address, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
        let packed = pipeline.get_packed_pipeline();
        let sent = self
            .node(address)?
            .req_packed_commands(&packed, 0, pipeline.len());
        if sent.is_err() {
            self.nodes.remove(address);
        }
        sent
    }

    /// Runs `pipeline` one part per slot on its master; see
    /// [`SyncConnection::query_split`].
    fn query_split(&mut self, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
        if self.map.is_empty() {
            self.refresh()?;
        }
        let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
        let split = slots::split_pipeline(pipeline, slots::Split::BySlot);
        let whole = [((0..commands.len()).collect::<Vec<usize>>(), pipeline)];
        let parts: Vec<(Vec<usize>, &Pipeline)> = match &split {
            Some(parts) => parts.iter().map(|(at, part)| (at.clone(), part)).collect(),
            None => whole.into_iter().collect(),
        };
        let mut values = vec![Value::Nil; pipeline.len()];
        let mut stale = false;
        for (indices, part) in parts {
            let slot = indices
                .iter()
                .find_map(|index| slots::command_slot(commands[*index]))
                .unwrap_or(0);
            let Some(master) = self.map.master(slot).cloned() else {
                self.refresh()?;
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no master serves the slot yet",
                )));
            };
            let replies = self.send(&master, part)?;
            for (index, value) in indices.iter().zip(replies) {
                values[*index] = self.redirected(commands[*index], &master, value, &mut stale)?;
            }
        }
        if stale {
            self.refresh()?;
        }
        Ok(values)
    }

    /// `value`, or when it is a redirection, the reply of `cmd` sent again
    /// alone where it says.
    fn redirected(
        &mut self,
        cmd: &Cmd,
        from: &Address,
        mut value: Value,
        stale: &mut bool,
    ) -> RedisResult<Value> {
        let mut at = from.clone();
        for round in 0..REDIRECTS {
            let redirect = match &value {
                Value::ServerError(error) => Redirect::parse(&format!(
                    "{} {}",
                    error.code(),
                    error.details().unwrap_or("")
                )),
                _ => None,
            };
            let Some(redirect) = redirect else {
                return Ok(value);
            };
            let mut again = redis::pipe();
            match redirect {
                Redirect::Moved(slot, address) => {
                    self.map.moved(slot, address.clone());
                    *stale = true;
                    at = address;
                }
                Redirect::Ask(_, address) => {
                    again.cmd("ASKING");
                    at = address;
                }
                Redirect::Retry => {
                    std::thread::sleep(Duration::from_millis(25 * (round + 1)));
                }
            }
            again.add_command(cmd.clone());
            let mut replies = self.send(&at, &again)?;
            value = replies.pop().unwrap_or(Value::Nil);
        }
        Ok(value)
    }
}

impl SyncConnection {
    /// Whether this is a cluster connection.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The one-server connection, for what only it can do (sending
    /// pipelines back to back before reading their replies).
    pub fn one(&mut self) -> Option<&mut redis::Connection> {
        match self {
            Self::One(connection) => Some(connection),
            Self::Cluster(_) => None,
        }
    }

    /// Runs `pipeline` (not a transaction, no command marked ignored) and
    /// returns every command's reply in order; with `ignoring` (the
    /// pipeline's `ignore_errors`) refusals come back in place. On a
    /// cluster, one pipeline per slot, each to its master; a command
    /// answered with a redirection (`ASK` or `TRYAGAIN` while its slot
    /// migrates, `MOVED` after) is sent again alone where it says.
    pub fn query_split(&mut self, pipeline: &Pipeline, ignoring: bool) -> RedisResult<Vec<Value>> {
        let Self::Cluster(cluster) = self else {
            return pipeline.query(self);
        };
        let values = cluster.query_split(pipeline)?;
        if !ignoring {
            for value in &values {
                if let Value::ServerError(error) = value {
                    return Err(error.clone().into());
                }
            }
        }
        Ok(values)
    }
}

impl SyncConnection {
    /// Sets how long a reply may take (`None`: no bound).
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> RedisResult<()> {
        match self {
            Self::One(connection) => connection.set_read_timeout(timeout),
            Self::Cluster(connection) => {
                for node in connection.nodes.values() {
                    node.set_read_timeout(timeout)?;
                }
                connection.cluster.set_read_timeout(timeout)
            }
        }
    }
}

impl ConnectionLike for SyncConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Self::One(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Self::One(connection) => connection.req_packed_commands(cmd, offset, count),
            Self::Cluster(connection) => connection.cluster.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Self::One(connection) => connection.req_command(cmd),
            Self::Cluster(connection) => connection.cluster.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(connection) => connection.get_db(),
            Self::Cluster(_) => 0,
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Self::One(connection) => connection.check_connection(),
            Self::Cluster(connection) => connection.cluster.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Self::One(connection) => connection.is_open(),
            Self::Cluster(connection) => connection.cluster.is_open(),
        }
    }
}
