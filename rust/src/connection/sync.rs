//! The client's synchronous connection: to one server, or to a cluster
//! (redis-rs's cluster connection, which routes each command and pipeline
//! by its first key and follows `MOVED` and `ASK`).
//!
//! A cluster pipeline goes to the master of its first key: every command
//! in it must sit on that slot. [`SyncConnection::query_split`] splits a
//! pipeline that does not (one pipeline per slot) and puts the replies back
//! in order.

use redis::{Cmd, ConnectionLike, Pipeline, RedisResult, Value};

use super::slots;

/// A synchronous connection.
pub enum SyncConnection {
    /// One server (or the master that Sentinel names).
    One(redis::Connection),
    /// Redis Cluster.
    Cluster(Box<redis::cluster::ClusterConnection>),
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
    /// cluster, one pipeline per slot.
    pub fn query_split(&mut self, pipeline: &Pipeline, ignoring: bool) -> RedisResult<Vec<Value>> {
        let parts = if self.is_cluster() {
            slots::split_pipeline(pipeline)
        } else {
            None
        };
        let Some(parts) = parts else {
            return pipeline.query(self);
        };
        let mut values = vec![Value::Nil; pipeline.len()];
        for (indices, mut part) in parts {
            if ignoring {
                part.ignore_errors();
            }
            let replies: Vec<Value> = part.query(self)?;
            for (index, value) in indices.iter().zip(replies) {
                values[*index] = value;
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
            Self::Cluster(connection) => connection.set_read_timeout(timeout),
        }
    }
}

impl ConnectionLike for SyncConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Self::One(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
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
            Self::Cluster(connection) => connection.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Self::One(connection) => connection.req_command(cmd),
            Self::Cluster(connection) => connection.req_command(cmd),
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
            Self::Cluster(connection) => connection.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Self::One(connection) => connection.is_open(),
            Self::Cluster(connection) => connection.is_open(),
        }
    }
}
