//! The dispatcher's shared write connection.
//!
//! A [`Managed`] is a redis-rs `ConnectionManager` (multiplexed, reconnecting
//! by itself, with a response timeout) that also follows a Sentinel
//! failover: the manager reconnects only to the address it was made for, so
//! when a call fails because that node is gone or is no longer the master,
//! the link asks the sentinels again and swaps in a manager for the new
//! master. Every clone sees the swap. The failed call still fails: callers
//! already retry (the writer keeps its batch, the loops wait and retry).
//! When the sentinels are seen naming another master (the endpoint's
//! generation moved on), the next call swaps first, before it is sent.
//!
//! With Redis Cluster the link is redis-rs's cluster connection (one
//! multiplexed connection per master; commands routed by key, `MOVED` and
//! `ASK` followed). redis-rs refuses a pipeline whose commands sit on
//! several slots, and resends a redirected pipeline whole (with `ASKING`
//! before its first command only, so its commands before the redirected
//! one would run again). So the link sends a pipeline (unless it is a
//! transaction) as one pipeline per command or `MULTI` ... `EXEC` block,
//! all at once (redis-rs writes those for one master back to back on its
//! connection), and puts the replies back in order.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use log::{info, warn};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::{is_demoted, slots, Endpoint, CONNECT_TIMEOUT};

struct Shared {
    endpoint: Endpoint,
    response_timeout: Duration,
    db: i64,
    /// The manager in use, its generation (bumped at each swap) and the
    /// endpoint's generation when it was made.
    current: Mutex<(u64, u64, ConnectionManager)>,
    /// Held while the master is looked up, so one failure makes one lookup.
    refreshing: tokio::sync::Mutex<()>,
}

/// The reconnecting async connection to one server (or the master that
/// Sentinel names).
#[derive(Clone)]
pub struct Managed {
    shared: Arc<Shared>,
    /// This handle sends only on a manager made at this endpoint generation
    /// (see [`Link::pin`]).
    pin: Option<u64>,
}

/// A cluster's link.
#[derive(Clone)]
pub struct ClusterLink {
    connection: ClusterConnection,
}

/// The shared, reconnecting async connection, to one server or a cluster.
#[derive(Clone)]
pub enum Link {
    /// One server (or the master that Sentinel names).
    One(Managed),
    /// Redis Cluster.
    Cluster(ClusterLink),
}

impl Link {
    /// Connects to `endpoint`.
    pub async fn connect(endpoint: Endpoint, response_timeout: Duration) -> RedisResult<Self> {
        if let super::url::Target::Cluster(cluster) = &endpoint.target {
            let client = ClusterClient::builder(cluster.seeds.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(response_timeout)
                .overall_response_timeout(Some(response_timeout * 2))
                .build()?;
            let connection = client.get_async_connection().await?;
            return Ok(Self::Cluster(ClusterLink { connection }));
        }
        Ok(Self::One(
            Managed::connect(endpoint, response_timeout).await?,
        ))
    }
}

impl Link {
    /// With Sentinel, the endpoint's generation: how many times the
    /// sentinels were seen naming another master (`None` otherwise).
    #[must_use]
    pub fn generation(&self) -> Option<u64> {
        match self {
            Self::One(link) if link.shared.endpoint.follows_failover() => {
                Some(link.shared.endpoint.generation())
            }
            _ => None,
        }
    }

    /// With Sentinel, has this handle send only to the master of endpoint
    /// generation `generation` (`None`: whichever the sentinels name): a
    /// call once another is named fails before it is sent. Without
    /// Sentinel, nothing.
    pub fn pin(&mut self, generation: Option<u64>) {
        if let Self::One(link) = self {
            link.pin = generation;
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::One(link) => link.req_packed_command(cmd),
            Self::Cluster(link) => link.connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::One(link) => link.req_packed_commands(pipeline, offset, count),
            Self::Cluster(link) => link.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(link) => link.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

impl ClusterLink {
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let Some(parts) = slots::split_pipeline(pipeline, slots::Split::ByUnit) else {
                return self
                    .connection
                    .req_packed_commands(pipeline, offset, count)
                    .await;
            };
            let sent = parts.iter().map(|(_, part)| {
                let mut connection = self.connection.clone();
                async move { connection.req_packed_commands(part, 0, part.len()).await }
            });
            let replies = futures_util::future::join_all(sent).await;
            let mut values = vec![Value::Nil; pipeline.len()];
            for ((indices, _), reply) in parts.iter().zip(replies) {
                for (index, value) in indices.iter().zip(reply?) {
                    values[*index] = value;
                }
            }
            Ok(values)
        })
    }
}

async fn manager(
    endpoint: &Endpoint,
    response_timeout: Duration,
) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let info = endpoint.master().await?;
    ConnectionManager::new_with_config(redis::Client::open(info)?, config).await
}

impl Managed {
    /// Connects to `endpoint` (through its sentinels, if any).
    pub async fn connect(endpoint: Endpoint, response_timeout: Duration) -> RedisResult<Self> {
        let first = manager(&endpoint, response_timeout).await?;
        let seen = endpoint.generation();
        let db = match &endpoint.target {
            super::url::Target::Direct(info) => info.redis_settings().db(),
            super::url::Target::Sentinel(sentinel) => sentinel.redis.db(),
            super::url::Target::Cluster(_) => 0,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                endpoint,
                response_timeout,
                db,
                current: Mutex::new((0, seen, first)),
                refreshing: tokio::sync::Mutex::new(()),
            }),
            pin: None,
        })
    }

    fn current(&self) -> (u64, u64, ConnectionManager) {
        let current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (current.0, current.1, current.2.clone())
    }

    /// The manager to send on: a new one first if the sentinels named
    /// another master since this one was made. Refused when this handle is
    /// pinned to another endpoint generation than the manager's.
    async fn manager(&self) -> RedisResult<(u64, ConnectionManager)> {
        let (mut generation, mut seen, mut manager) = self.current();
        if seen != self.shared.endpoint.generation() {
            self.refresh(generation, "the sentinels name another master")
                .await;
            (generation, seen, manager) = self.current();
        }
        match self.pin {
            Some(pin) if pin != seen => Err(RedisError::from((
                redis::ErrorKind::Io,
                "the sentinels name another master",
                "not sent: it was meant for the one before".to_owned(),
            ))),
            _ => Ok((generation, manager)),
        }
    }

    /// After a failed call on generation `generation`: with Sentinel, when
    /// the node is gone or demoted, connect to the master the sentinels
    /// name now. One lookup per failure, whatever the number of callers.
    async fn after_failure(&self, generation: u64, error: &RedisError) {
        let shared = &self.shared;
        if !shared.endpoint.follows_failover() {
            return;
        }
        let lost = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || is_demoted(error);
        if lost {
            self.refresh(generation, &error.to_string()).await;
        }
    }

    /// Swaps in a manager for the master the sentinels name now, unless
    /// another caller already replaced `generation`.
    async fn refresh(&self, generation: u64, error: &str) {
        let shared = &self.shared;
        let _one = shared.refreshing.lock().await;
        if self.current().0 != generation {
            return;
        }
        match manager(&shared.endpoint, shared.response_timeout).await {
            Ok(fresh) => {
                let seen = shared.endpoint.generation();
                let mut current = shared
                    .current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                *current = (generation + 1, seen, fresh);
                info!(
                    "redis at {}: connected to the master the sentinels name now (after: {error})",
                    shared.endpoint.masked()
                );
            }
            Err(lookup) => warn!(
                "redis at {}: the master cannot be reached yet ({lookup}); will ask again",
                shared.endpoint.masked()
            ),
        }
    }
}

impl ConnectionLike for Managed {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut manager) = self.manager().await?;
            let result = manager.req_packed_command(cmd).await;
            if let Err(error) = &result {
                self.after_failure(generation, error).await;
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut manager) = self.manager().await?;
            let result = manager.req_packed_commands(pipeline, offset, count).await;
            if let Err(error) = &result {
                self.after_failure(generation, error).await;
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.db
    }
}
