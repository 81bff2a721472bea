//! Every connection to Redis is built here, from its URL: the client's
//! synchronous connection, the dispatcher's reconnecting async connection
//! ([`Link`]) and its zero-copy read connections ([`RawConnection`]).
//!
//! - [`url`]: the URL forms, parsed; passwords masked;
//! - [`tls`]: rustls settings for the read connections;
//! - [`raw`]: the zero-copy request/response connection;
//! - [`link`]: the shared write connection, which follows a Sentinel
//!   failover.
//!
//! With Sentinel, every new connection asks the sentinels where the master
//! is (`SENTINEL get-master-addr-by-name`, on a connection kept to the first
//! sentinel that answers, every step within a timeout), so a reconnect after
//! a failover reaches the new master. redis-rs's `Sentinel` does the same
//! lookup plus a `ROLE` check, but its synchronous one has no connect
//! timeout, so one unreachable sentinel address could stall a `Client`
//! call; a node named too early answers writes with `READONLY`, which the
//! next paragraph covers.
//! A `READONLY` reply (the old master came back as a replica) drops the
//! connection, so the next call reconnects the same way. And because an old
//! master that is still up keeps taking writes until Sentinel turns it into
//! a replica (up to ten seconds later, and those writes are then thrown
//! away), the sentinels are also asked once a second where the master is
//! ([`Endpoint::watch_master`] in the engine, a check before a call at most
//! once a second in the client): when they name another one, every
//! connection made before moves to it.

pub mod link;
pub mod raw;
pub mod slots;
pub mod sync;
pub mod tls;
pub mod url;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use log::info;
use redis::aio::MultiplexedConnection;
use redis::{
    ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisConnectionInfo, RedisError,
    RedisResult,
};

pub use link::Link;
pub use raw::{RawConnection, RawError};
pub use sync::SyncConnection;
use url::{Parsed, Target};

/// How long making a TCP connection (and its TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad redis URL: {0}")]
pub struct UrlError(pub String);

/// How often the sentinels are asked where the master is.
pub const MASTER_CHECK: Duration = Duration::from_secs(1);

/// The sentinels of a `redis+sentinel://` URL, asked for the master.
struct Sentinels {
    master: String,
    /// User, password and database for the master.
    redis: RedisConnectionInfo,
    addresses: Vec<ConnectionInfo>,
    /// Connections kept to one sentinel, for the lookups.
    probe_sync: Mutex<Option<redis::Connection>>,
    probe: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// The master last named, and how many times that changed.
    named: Mutex<Option<(String, u16)>>,
    generation: AtomicU64,
}

impl Sentinels {
    /// How to reach the master at `named`.
    fn master_info(&self, (host, port): (String, u16)) -> RedisResult<ConnectionInfo> {
        Ok(ConnectionAddr::Tcp(host, port)
            .into_connection_info()?
            .set_redis_settings(self.redis.clone()))
    }

    /// Records that the sentinels name `named`; a change bumps the
    /// generation, which every connection made before follows.
    fn note(&self, named: (String, u16), url: &str) {
        let mut last = self.named.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_ref().is_some_and(|last| *last != named) {
            self.generation.fetch_add(1, Ordering::Release);
            info!(
                "redis at {url}: the sentinels name a new master, {}:{}; moving to it",
                named.0, named.1
            );
        }
        *last = Some(named);
    }

    fn parse_reply(reply: Option<(String, String)>) -> Option<(String, u16)> {
        let (host, port) = reply?;
        Some((host, port.parse().ok()?))
    }

    fn ask_sync(&self) -> Option<(String, u16)> {
        let mut probe = self
            .probe_sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut question = redis::cmd("SENTINEL");
        question.arg("get-master-addr-by-name").arg(&self.master);
        if let Some(connection) = probe.as_mut() {
            if let Ok(reply) = question.query(connection) {
                return Self::parse_reply(reply);
            }
            *probe = None;
        }
        for info in &self.addresses {
            let Ok(client) = redis::Client::open(info.clone()) else {
                continue;
            };
            let Ok(mut connection) = client.get_connection_with_timeout(MASTER_CHECK) else {
                continue;
            };
            let _ = connection.set_read_timeout(Some(MASTER_CHECK));
            if let Ok(reply) = question.query(&mut connection) {
                *probe = Some(connection);
                return Self::parse_reply(reply);
            }
        }
        None
    }

    async fn ask(&self) -> Option<(String, u16)> {
        let mut probe = self.probe.lock().await;
        let mut question = redis::cmd("SENTINEL");
        question.arg("get-master-addr-by-name").arg(&self.master);
        if let Some(connection) = probe.as_mut() {
            if let Ok(reply) = question.query_async(connection).await {
                return Self::parse_reply(reply);
            }
            *probe = None;
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(MASTER_CHECK))
            .set_response_timeout(Some(MASTER_CHECK));
        for info in &self.addresses {
            let Ok(client) = redis::Client::open(info.clone()) else {
                continue;
            };
            let Ok(mut connection) = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            else {
                continue;
            };
            if let Ok(reply) = question.query_async(&mut connection).await {
                *probe = Some(connection);
                return Self::parse_reply(reply);
            }
        }
        None
    }
}

/// A parsed Redis URL, from which every connection is made. Clones share
/// their sentinel connections.
#[derive(Clone)]
pub struct Endpoint {
    target: Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    sentinels: Option<Arc<Sentinels>>,
    masked: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.masked)
    }
}

/// The error codes of a node that is no longer the master (after a
/// failover): writes refused, blocked reads dropped, a replica cut off.
const DEMOTED: [&str; 3] = ["READONLY", "UNBLOCKED", "MASTERDOWN"];

/// Whether `error` says the node is no longer the master.
#[must_use]
pub fn is_demoted(error: &RedisError) -> bool {
    error.code().is_some_and(|code| DEMOTED.contains(&code))
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "redis unavailable",
        format!("{what}: {error}"),
    ))
}

impl Endpoint {
    /// Parses `url`; see [`url`] for the forms.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let Parsed {
            target,
            tls,
            masked,
        } = url::parse(url)?;
        let tls = tls
            .map(|files| tls::client_config(&files))
            .transpose()
            .map_err(|why| UrlError(format!("{masked}: {why}")))?;
        let sentinels = match &target {
            Target::Direct(_) | Target::Cluster(_) => None,
            Target::Sentinel(sentinel) => Some(Arc::new(Sentinels {
                master: sentinel.master.clone(),
                redis: sentinel.redis.clone(),
                addresses: sentinel.sentinels.clone(),
                probe_sync: Mutex::new(None),
                probe: tokio::sync::Mutex::new(None),
                named: Mutex::new(None),
                generation: AtomicU64::new(0),
            })),
        };
        Ok(Self {
            target,
            tls,
            sentinels,
            masked,
        })
    }

    /// The URL with its password masked.
    #[must_use]
    pub fn masked(&self) -> &str {
        &self.masked
    }

    /// Whether the server behind this endpoint can change (Sentinel).
    #[must_use]
    pub fn follows_failover(&self) -> bool {
        self.sentinels.is_some()
    }

    /// How many times the sentinels were seen naming another master (0
    /// without Sentinel). A connection made at an older generation moves.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.sentinels
            .as_ref()
            .map_or(0, |sentinels| sentinels.generation.load(Ordering::Acquire))
    }

    /// Asks the sentinels where the master is (without Sentinel, nothing).
    pub fn check_master_sync(&self) {
        if let Some(sentinels) = &self.sentinels {
            if let Some(named) = sentinels.ask_sync() {
                sentinels.note(named, &self.masked);
            }
        }
    }

    /// Asks the sentinels once a second where the master is, for as long as
    /// it runs (the engine runs it beside its other loops).
    pub async fn watch_master(self) {
        let Some(sentinels) = self.sentinels.clone() else {
            return std::future::pending().await;
        };
        let mut every = tokio::time::interval(MASTER_CHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Some(named) = sentinels.ask().await {
                sentinels.note(named, &self.masked);
            }
        }
    }

    /// Where the master is now, asked synchronously.
    fn master_sync(&self) -> RedisResult<ConnectionInfo> {
        match (&self.target, &self.sentinels) {
            (Target::Direct(info), _) => Ok(info.clone()),
            (_, Some(sentinels)) => {
                let named = sentinels.ask_sync().ok_or_else(|| self.no_master())?;
                sentinels.note(named.clone(), &self.masked);
                sentinels.master_info(named)
            }
            _ => Err(unavailable(&self.masked, "no server to connect to")),
        }
    }

    /// Where the master is now.
    async fn master(&self) -> RedisResult<ConnectionInfo> {
        match (&self.target, &self.sentinels) {
            (Target::Direct(info), _) => Ok(info.clone()),
            (_, Some(sentinels)) => {
                let named = sentinels.ask().await.ok_or_else(|| self.no_master())?;
                sentinels.note(named.clone(), &self.masked);
                sentinels.master_info(named)
            }
            _ => Err(unavailable(&self.masked, "no server to connect to")),
        }
    }

    fn no_master(&self) -> RedisError {
        let master = self
            .sentinels
            .as_ref()
            .map_or("", |sentinels| sentinels.master.as_str());
        unavailable(
            &format!("sentinels of {}", self.masked),
            format!("none answered with an address for master {master:?}"),
        )
    }

    /// A synchronous connection, to one server or a cluster, whose every
    /// call times out after `timeout`.
    pub fn connect_any_sync(&self, timeout: Duration) -> RedisResult<SyncConnection> {
        if let Target::Cluster(cluster) = &self.target {
            let client = redis::cluster::ClusterClient::builder(cluster.seeds.clone())
                .connection_timeout(timeout.min(CONNECT_TIMEOUT))
                .response_timeout(timeout)
                .build()?;
            let connection = client.get_connection()?;
            connection.set_read_timeout(Some(timeout))?;
            connection.set_write_timeout(Some(timeout))?;
            return Ok(SyncConnection::Cluster(Box::new(sync::ClusterSync::new(
                connection,
                cluster.seeds.first(),
                timeout,
            ))));
        }
        Ok(SyncConnection::One(self.connect_sync(timeout)?))
    }

    /// A synchronous connection whose every call times out after `timeout`.
    pub fn connect_sync(&self, timeout: Duration) -> RedisResult<redis::Connection> {
        let client = redis::Client::open(self.master_sync()?)?;
        let connection = client.get_connection_with_timeout(timeout.min(CONNECT_TIMEOUT))?;
        connection.set_read_timeout(Some(timeout))?;
        connection.set_write_timeout(Some(timeout))?;
        Ok(connection)
    }

    /// The dispatcher's async connection, reconnecting by itself (to the new
    /// master after a failover); a reply not in within `response_timeout`
    /// fails the call.
    pub async fn connect_managed(&self, response_timeout: Duration) -> RedisResult<Link> {
        Link::connect(self.clone(), response_timeout).await
    }

    /// Whether this endpoint is a Redis Cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// A zero-copy read connection named `name` (`CLIENT SETNAME`, shown by
    /// `CLIENT LIST`); connects on first use. A reply not in within
    /// `timeout` fails the call.
    #[must_use]
    pub fn raw(&self, name: &str, timeout: Duration) -> RawConnection {
        RawConnection::new(self.clone(), name, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_when_parsed() {
        assert!(Endpoint::parse("redis://127.0.0.1:6379/0").is_ok());
        assert!(Endpoint::parse("unix:///tmp/redis.sock").is_ok());
        assert!(Endpoint::parse("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none").is_ok());
        assert!(Endpoint::parse("redis+sentinel://127.0.0.1:26379/main").is_ok());
        assert!(Endpoint::parse("nonsense://x").is_err());
    }
}
