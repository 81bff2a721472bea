//! flumeq's Redis URLs, parsed into what a connection is made from.
//!
//! - `redis://[user:pass@]host[:port][/db]`, `unix:///path[?db=N]`: one server;
//! - `rediss://...?ssl_ca_certs=&ssl_certfile=&ssl_keyfile=&ssl_cert_reqs=`:
//!   one server over TLS, with redis-py's parameter names;
//! - `redis+sentinel://[user:pass@]host:port[,host:port...]/<master>[/<db>]`:
//!   the master that the sentinels name (user and password are the
//!   master's; the sentinels are reached without them);
//! - `redis+cluster://[user:pass@]host:port[,host:port...]`: Redis Cluster.
//!
//! Every error names the URL with its password masked.

use std::path::Path;

use percent_encoding::percent_decode_str;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use super::UrlError;

/// Where the connections go.
#[derive(Debug, Clone)]
pub enum Target {
    /// One server (TCP, TLS or a unix socket).
    Direct(ConnectionInfo),
    /// The master that Sentinel names.
    Sentinel(SentinelTarget),
    /// A Redis Cluster, found from its seed nodes.
    Cluster(ClusterTarget),
}

/// A master found through sentinels.
#[derive(Debug, Clone)]
pub struct SentinelTarget {
    /// The sentinels, in the URL's order.
    pub sentinels: Vec<ConnectionInfo>,
    /// The monitored master's name.
    pub master: String,
    /// User, password and database for the master.
    pub redis: RedisConnectionInfo,
}

/// A Redis Cluster.
#[derive(Debug, Clone)]
pub struct ClusterTarget {
    /// The seed nodes, in the URL's order.
    pub seeds: Vec<ConnectionInfo>,
}

/// The TLS settings of a `rediss://` URL.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA bundle (PEM) that signs the server's certificate; the system's
    /// roots when absent.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key (PEM), for servers that ask for one.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// Whether the server's certificate is checked (`ssl_cert_reqs` other
    /// than `none`).
    pub verify: bool,
}

/// A parsed URL.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// Where to connect.
    pub target: Target,
    /// TLS settings, for `rediss://`.
    pub tls: Option<TlsFiles>,
    /// The URL with its password replaced by `***`, for logs and errors.
    pub masked: String,
}

/// `url` with the password of its user part replaced by `***`.
#[must_use]
pub fn mask(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &rest[..colon],
        &rest[at..]
    )
}

fn decoded(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// Parses `url` into a target; file parameters are read here, so a missing
/// CA file fails now, naming the parameter.
pub fn parse(url: &str) -> Result<Parsed, UrlError> {
    let masked = mask(url);
    let bad = |why: String| UrlError(format!("{masked}: {why}"));
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(bad(
            "expected redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://".into(),
        ));
    };
    let (target, tls) = match scheme {
        "redis" | "unix" => (Target::Direct(direct(url).map_err(bad)?), None),
        "rediss" => {
            let (info, tls) = secure(url).map_err(bad)?;
            (Target::Direct(info), Some(tls))
        }
        "redis+sentinel" => (Target::Sentinel(sentinel(url).map_err(bad)?), None),
        "redis+cluster" => (Target::Cluster(cluster(url).map_err(bad)?), None),
        other => {
            return Err(bad(format!(
                "unknown scheme {other:?}: expected redis, rediss, unix, redis+sentinel or redis+cluster"
            )))
        }
    };
    Ok(Parsed {
        target: quiet(target),
        tls,
        masked,
    })
}

/// No `CLIENT SETINFO` at connect (Redis 7.2+): one command fewer for an
/// ACL to grant, and none refused on 7.0.
fn quiet(target: Target) -> Target {
    let skip = |info: ConnectionInfo| {
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        info.set_redis_settings(settings)
    };
    match target {
        Target::Direct(info) => Target::Direct(skip(info)),
        Target::Sentinel(mut sentinel) => {
            sentinel.redis = sentinel.redis.set_skip_set_lib_name();
            sentinel.sentinels = sentinel.sentinels.into_iter().map(skip).collect();
            Target::Sentinel(sentinel)
        }
        Target::Cluster(mut cluster) => {
            cluster.seeds = cluster.seeds.into_iter().map(skip).collect();
            Target::Cluster(cluster)
        }
    }
}

fn direct(url: &str) -> Result<ConnectionInfo, String> {
    url.into_connection_info()
        .map_err(|error| error.to_string())
}

/// `rediss://`: redis-py's `ssl_*` query parameters are taken out and read;
/// the rest of the URL goes to redis-rs.
fn secure(url: &str) -> Result<(ConnectionInfo, TlsFiles), String> {
    let mut parsed = ::url::Url::parse(url).map_err(|error| error.to_string())?;
    let mut files = TlsFiles {
        verify: true,
        ..TlsFiles::default()
    };
    let (mut ca, mut cert, mut key) = (None, None, None);
    let mut kept = Vec::new();
    for (name, value) in parsed.query_pairs() {
        match name.as_ref() {
            "ssl_ca_certs" => ca = Some(value.into_owned()),
            "ssl_certfile" => cert = Some(value.into_owned()),
            "ssl_keyfile" => key = Some(value.into_owned()),
            "ssl_cert_reqs" => {
                files.verify = match value.to_ascii_lowercase().as_str() {
                    "required" | "cert_required" | "optional" | "cert_optional" => true,
                    "none" | "cert_none" => false,
                    other => {
                        return Err(format!(
                            "ssl_cert_reqs={other:?}: expected required, optional or none"
                        ))
                    }
                }
            }
            _ => kept.push((name.into_owned(), value.into_owned())),
        }
    }
    let read = |name: &str, path: &str| {
        std::fs::read(Path::new(path)).map_err(|error| format!("{name}={path:?}: {error}"))
    };
    files.ca = ca.map(|path| read("ssl_ca_certs", &path)).transpose()?;
    files.client = match (cert, key) {
        (Some(cert), Some(key)) => Some((read("ssl_certfile", &cert)?, read("ssl_keyfile", &key)?)),
        (None, None) => None,
        _ => return Err("ssl_certfile and ssl_keyfile go together: give both or neither".into()),
    };
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    if files.verify {
        parsed.set_fragment(None);
    } else {
        parsed.set_fragment(Some("insecure"));
    }
    let info = parsed
        .as_str()
        .into_connection_info()
        .map_err(|error| error.to_string())?;
    let info = if files.ca.is_some() || files.client.is_some() {
        let certificates = redis::TlsCertificates {
            client_tls: files.client.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: files.ca.clone(),
        };
        redis::Client::build_with_tls(info, certificates)
            .map_err(|error| error.to_string())?
            .get_connection_info()
            .clone()
    } else {
        info
    };
    Ok((info, files))
}

/// The user part and the comma-separated `host:port` list of a multi-host
/// URL, and what follows the hosts.
struct Hosts<'a> {
    redis: RedisConnectionInfo,
    nodes: Vec<ConnectionInfo>,
    path: &'a str,
}

fn hosts(url: &str, default_port: u16) -> Result<Hosts<'_>, String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (user_part, host_list) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let mut redis = RedisConnectionInfo::default();
    if let Some(user_part) = user_part {
        let (user, password) = match user_part.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (user_part, None),
        };
        if !user.is_empty() {
            redis = redis.set_username(decoded(user));
        }
        if let Some(password) = password.filter(|password| !password.is_empty()) {
            redis = redis.set_password(decoded(password));
        }
    }
    let mut nodes = Vec::new();
    for node in host_list.split(',').filter(|node| !node.is_empty()) {
        let (host, port) = match node.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("bad port in {node:?}"))?;
                (host, port)
            }
            None => (node, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("no host in {node:?}"));
        }
        nodes.push(
            ConnectionAddr::Tcp(host.to_owned(), port)
                .into_connection_info()
                .map_err(|error| error.to_string())?,
        );
    }
    if nodes.is_empty() {
        return Err("no host:port given".into());
    }
    Ok(Hosts { redis, nodes, path })
}

fn sentinel(url: &str) -> Result<SentinelTarget, String> {
    let Hosts { redis, nodes, path } = hosts(url, 26379)?;
    if path.contains(['?', '#']) {
        return Err("query parameters are not supported on redis+sentinel:// URLs".into());
    }
    let mut segments = path.split('/').filter(|segment| !segment.is_empty());
    let Some(master) = segments.next() else {
        return Err("no master name: expected redis+sentinel://host:port[,host:port...]/<master name>[/<db>]".into());
    };
    let redis = match segments.next() {
        Some(db) => redis.set_db(
            db.parse()
                .map_err(|_| format!("bad database number {db:?}"))?,
        ),
        None => redis,
    };
    if segments.next().is_some() {
        return Err("too many path parts: expected /<master name>[/<db>]".into());
    }
    Ok(SentinelTarget {
        sentinels: nodes,
        master: decoded(master),
        redis,
    })
}

fn cluster(url: &str) -> Result<ClusterTarget, String> {
    let Hosts { redis, nodes, path } = hosts(url, 6379)?;
    if !path.trim_matches('/').is_empty() {
        return Err("Redis Cluster has only database 0: give no path".into());
    }
    let seeds = nodes
        .into_iter()
        .map(|node| node.set_redis_settings(redis.clone()))
        .collect();
    Ok(ClusterTarget { seeds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(mask("redis://:secret@h"), "redis://:***@h");
        assert_eq!(mask("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(mask("redis://user@h:1"), "redis://user@h:1");
        assert_eq!(
            mask("redis+sentinel://u:p@a:1,b:2/m"),
            "redis+sentinel://u:***@a:1,b:2/m"
        );
        let error = parse("redis+sentinel://u:hunter2@a:1,b:x/m").expect_err("refused");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn sentinel_urls() {
        let Target::Sentinel(target) = parse("redis+sentinel://u:p%40ss@a:1,b:2/main/3")
            .expect("parses")
            .target
        else {
            panic!("not sentinel")
        };
        assert_eq!(target.sentinels.len(), 2);
        assert_eq!(target.master, "main");
        assert_eq!(target.redis.db(), 3);
        assert_eq!(target.redis.username(), Some("u"));
        assert_eq!(target.redis.password(), Some("p@ss"));
        assert!(parse("redis+sentinel://a:1").is_err());
        assert!(parse("redis+sentinel://a:1/m/x").is_err());
    }

    #[test]
    fn cluster_urls() {
        let Target::Cluster(target) = parse("redis+cluster://a:7000,b:7001")
            .expect("parses")
            .target
        else {
            panic!("not cluster")
        };
        assert_eq!(target.seeds.len(), 2);
        assert!(parse("redis+cluster://a:7000/1").is_err());
    }

    #[test]
    fn tls_urls() {
        let parsed = parse("rediss://h:6380/0?ssl_cert_reqs=none").expect("parses");
        assert!(!parsed.tls.expect("tls").verify);
        let error = parse("rediss://h:6380?ssl_ca_certs=/nonexistent/ca.pem").expect_err("refused");
        assert!(error.to_string().contains("ssl_ca_certs"), "{error}");
        assert!(parse("rediss://h?ssl_certfile=/x").is_err());
        assert!(parse("rediss://h?ssl_cert_reqs=maybe").is_err());
    }
}
