//! The only module that speaks to Redis.
//!
//! The client side is synchronous (`redis::Connection`): a `Client` creates no
//! thread, so a process that enqueues may still fork its actors safely. The
//! dispatcher side is async (tokio + `ConnectionManager`, which reconnects by
//! itself).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisResult, Value};

use crate::envelope::{field, NewTask, RawEntry};
use crate::keys::Keys;

/// Entries per pipeline when enqueueing many tasks: large enough to amortise
/// the round trip, small enough to keep Redis' query buffer modest.
const ENQUEUE_CHUNK: usize = 2000;

/// Parses an XREAD/XREADGROUP reply into `(stream key, entry)` pairs.
/// RESP2 returns nested arrays, RESP3 a map; a timed-out block returns nil.
#[must_use]
pub fn parse_read_reply(reply: Value) -> Vec<(Vec<u8>, RawEntry)> {
    let streams: Vec<(Value, Value)> = match reply {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    Some((pair.next()?, pair.next()?))
                }
                _ => None,
            })
            .collect(),
        Value::Map(items) => items,
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for (key, entries) in streams {
        let Value::BulkString(key) = key else {
            continue;
        };
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            if let Some(entry) = parse_entry(entry) {
                out.push((key.clone(), entry));
            }
        }
    }
    out
}

fn bulk(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        Value::Int(number) => Some(number.to_string().into_bytes()),
        _ => None,
    }
}

/// Parses one `[id, [field, value, ...]]` stream entry. Entries whose fields
/// are nil (deleted while pending) yield an entry with no fields.
#[must_use]
pub fn parse_entry(entry: Value) -> Option<RawEntry> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let mut parts = parts.into_iter();
    let entry_id = String::from_utf8(bulk(parts.next()?)?).ok()?;
    let mut fields = Vec::new();
    match parts.next() {
        Some(Value::Array(flat)) => {
            let mut flat = flat.into_iter();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                if let (Some(name), Some(value)) = (bulk(name), bulk(value)) {
                    fields.push((name, value));
                }
            }
        }
        Some(Value::Map(pairs)) => {
            for (name, value) in pairs {
                if let (Some(name), Some(value)) = (bulk(name), bulk(value)) {
                    fields.push((name, value));
                }
            }
        }
        _ => {}
    }
    Some(RawEntry { entry_id, fields })
}

/// Adds `XADD stream * field value ...` for `task` to `pipe`.
fn push_xadd(pipe: &mut Pipeline, stream: &str, task: &NewTask<'_>) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in task.to_fields() {
        cmd.arg(name).arg(value);
    }
    pipe.add_command(cmd);
}

/// Counters and sizes of one queue, as `Client.stats` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries not yet delivered to the group.
    pub ready: u64,
    /// Entries delivered and not yet acknowledged.
    pub in_flight: u64,
    /// Scheduled or retrying tasks.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Tasks done successfully.
    pub processed: u64,
    /// Failed runs.
    pub failed: u64,
}

fn as_u64(value: &Value) -> u64 {
    match value {
        Value::Int(number) => (*number).max(0) as u64,
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn pairs(value: Value) -> Vec<(Vec<u8>, Value)> {
    match value {
        Value::Array(items) => {
            let mut out = Vec::new();
            let mut items = items.into_iter();
            while let (Some(name), Some(value)) = (items.next(), items.next()) {
                if let Some(name) = bulk(name) {
                    out.push((name, value));
                }
            }
            out
        }
        Value::Map(items) => items
            .into_iter()
            .filter_map(|(name, value)| Some((bulk(name)?, value)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Pending count of `group` from an `XINFO GROUPS` reply.
fn group_pending(reply: Value, group: &str) -> u64 {
    let Value::Array(groups) = reply else {
        return 0;
    };
    for info in groups {
        let info = pairs(info);
        let name = info
            .iter()
            .find(|(key, _)| key == b"name")
            .and_then(|(_, value)| bulk(value.clone()));
        if name.as_deref() == Some(group.as_bytes()) {
            return info
                .iter()
                .find(|(key, _)| key == b"pending")
                .map_or(0, |(_, value)| as_u64(value));
        }
    }
    0
}

/// The synchronous store the client uses.
pub struct SyncStore {
    client: redis::Client,
    connection: Option<redis::Connection>,
    keys: Keys,
    timeout: Duration,
}

impl SyncStore {
    /// A store for `url`; connects lazily.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> RedisResult<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: None,
            keys: Keys::new(prefix),
            timeout,
        })
    }

    /// The key builder.
    #[must_use]
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn run<T>(
        &mut self,
        call: impl FnOnce(&mut redis::Connection, &Keys) -> RedisResult<T>,
    ) -> RedisResult<T> {
        if self.connection.is_none() {
            let connection = self.client.get_connection_with_timeout(self.timeout)?;
            connection.set_read_timeout(Some(self.timeout))?;
            connection.set_write_timeout(Some(self.timeout))?;
            self.connection = Some(connection);
        }
        let Some(connection) = self.connection.as_mut() else {
            unreachable!("connection set above");
        };
        let result = call(connection, &self.keys);
        if let Err(error) = &result {
            // A broken or timed-out connection may hold half a reply: drop it
            // and start clean next time.
            if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
                self.connection = None;
            }
        }
        result
    }

    /// Drops the connection; the next call makes a new one.
    pub fn disconnect(&mut self) {
        self.connection = None;
    }

    /// Round trip check.
    pub fn ping(&mut self) -> RedisResult<()> {
        self.run(|connection, _| redis::cmd("PING").query::<()>(connection))
    }

    /// Appends `tasks` to `queue`'s stream in pipelines; returns their entry ids.
    pub fn enqueue(&mut self, queue: &str, tasks: &[NewTask<'_>]) -> RedisResult<Vec<String>> {
        self.run(|connection, keys| {
            let stream = keys.stream(queue);
            let mut ids = Vec::with_capacity(tasks.len());
            for (number, chunk) in tasks.chunks(ENQUEUE_CHUNK).enumerate() {
                let mut pipe = redis::pipe();
                if number == 0 {
                    pipe.cmd("SADD").arg(keys.queues()).arg(queue).ignore();
                }
                for task in chunk {
                    push_xadd(&mut pipe, &stream, task);
                }
                ids.extend(pipe.query::<Vec<String>>(connection)?);
            }
            Ok(ids)
        })
    }

    /// Sizes and counters of `queue` as seen by consumer group `group`.
    pub fn stats(&mut self, queue: &str, group: &str) -> RedisResult<QueueStats> {
        self.run(|connection, keys| {
            let stream = keys.stream(queue);
            let (length, groups, delayed, dead, counters): (u64, Value, u64, u64, Value) =
                redis::pipe()
                    .cmd("XLEN")
                    .arg(&stream)
                    .cmd("EVAL")
                    .arg(XINFO_GROUPS_OR_EMPTY)
                    .arg(1)
                    .arg(&stream)
                    .cmd("ZCARD")
                    .arg(keys.delayed(queue))
                    .cmd("XLEN")
                    .arg(keys.dead(queue))
                    .cmd("HGETALL")
                    .arg(keys.stats(queue))
                    .query(connection)?;
            let in_flight = group_pending(groups, group);
            let counters: HashMap<Vec<u8>, u64> = pairs(counters)
                .into_iter()
                .map(|(name, value)| (name, as_u64(&value)))
                .collect();
            let counter = |name: &str| counters.get(name.as_bytes()).copied().unwrap_or(0);
            Ok(QueueStats {
                // Done entries are deleted, so the stream holds exactly the
                // undelivered and the pending ones.
                ready: length.saturating_sub(in_flight),
                in_flight,
                delayed,
                dead,
                processed: counter("processed"),
                failed: counter("failed"),
            })
        })
    }

    /// Runs an arbitrary command (tests and tools).
    pub fn command(&mut self, command: &Cmd) -> RedisResult<Value> {
        self.run(|connection, _| command.query(connection))
    }
}

/// KEYS[1] = stream. Returns `XINFO GROUPS` of the stream, or an empty array
/// when the stream does not exist yet (plain XINFO would be an error).
const XINFO_GROUPS_OR_EMPTY: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
return redis.call('XINFO', 'GROUPS', KEYS[1])
";

/// A queue as the dispatcher serves it.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Share of each read when several queues have work.
    pub weight: u32,
    /// Its stream key.
    pub stream: String,
}

/// Connects the dispatcher's async connection (reconnecting by itself).
pub async fn connect(url: &str, response_timeout: Duration) -> RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config).await
}

/// Creates the consumer group of every queue (at id 0, so tasks enqueued
/// before the first engine started are served) and registers the queues.
pub async fn ensure_groups(
    connection: &mut ConnectionManager,
    keys: &Keys,
    queues: &[QueueSpec],
    group: &str,
) -> RedisResult<()> {
    for queue in queues {
        let created: RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&queue.stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(connection)
            .await;
        match created {
            Ok(_) => {}
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(error),
        }
        redis::cmd("SADD")
            .arg(keys.queues())
            .arg(&queue.name)
            .query_async::<()>(connection)
            .await?;
    }
    Ok(())
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
    connection: &mut ConnectionManager,
    queues: &[QueueSpec],
    group: &str,
    consumer: &str,
    count: usize,
    block_ms: u64,
) -> RedisResult<Vec<(u16, RawEntry)>> {
    let index_of = |key: &[u8]| {
        queues
            .iter()
            .position(|queue| queue.stream.as_bytes() == key)
            .map(|index| index as u16)
    };
    let tag = |entries: Vec<(Vec<u8>, RawEntry)>| -> Vec<(u16, RawEntry)> {
        entries
            .into_iter()
            .filter_map(|(key, entry)| Some((index_of(&key)?, entry)))
            .collect()
    };
    if queues.len() > 1 {
        let total: u64 = queues.iter().map(|queue| u64::from(queue.weight)).sum();
        let mut pipe = redis::pipe();
        for queue in queues {
            let share = (count as u64 * u64::from(queue.weight)).div_ceil(total.max(1)) as usize;
            let mut cmd = xreadgroup(group, consumer, share.max(1), None);
            cmd.arg(&queue.stream).arg(">");
            pipe.add_command(cmd);
        }
        let replies: Vec<Value> = pipe.query_async(connection).await?;
        let entries: Vec<_> = replies.into_iter().flat_map(parse_read_reply).collect();
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
    let reply: Value = cmd.query_async(connection).await?;
    Ok(tag(parse_read_reply(reply)))
}

/// A task to move to the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The entry as read.
    pub entry: RawEntry,
    /// Short cause: `error`, `unknown_type`, `invalid`, `rejected`, ...
    pub reason: &'static str,
    /// Error text.
    pub error: Vec<u8>,
    /// Formatted traceback (may be empty).
    pub traceback: Vec<u8>,
    /// Runs made, including the last one.
    pub attempts: u32,
}

/// What one queue's finished tasks need written back.
#[derive(Debug, Default, Clone)]
pub struct QueueOutcomes {
    /// Entries to acknowledge and delete (done or dead-lettered).
    pub finished: Vec<String>,
    /// Entries to copy to the dead-letter stream first.
    pub dead: Vec<DeadLetter>,
    /// Successful runs.
    pub processed: u64,
    /// Failed runs.
    pub failed: u64,
}

impl QueueOutcomes {
    /// Whether there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.finished.is_empty() && self.dead.is_empty() && self.processed == 0 && self.failed == 0
    }

    /// Adds `other` to `self`.
    pub fn merge(&mut self, other: Self) {
        self.finished.extend(other.finished);
        self.dead.extend(other.dead);
        self.processed += other.processed;
        self.failed += other.failed;
    }
}

/// Fields never copied from a task into its dead letter (they are rewritten).
const DEAD_OWN_FIELDS: [&str; 6] = [
    field::ERROR,
    "traceback",
    "reason",
    "failed_at",
    "attempts",
    "origin_id",
];

/// Writes the outcomes of every queue in one pipeline: dead letters first,
/// then `XACK` + `XDEL` of the finished entries, then the counters. If the
/// connection drops halfway, a task may be dead-lettered twice but never lost.
pub async fn write_outcomes(
    connection: &mut ConnectionManager,
    keys: &Keys,
    queues: &[QueueSpec],
    group: &str,
    outcomes: &[QueueOutcomes],
    dead_max_length: usize,
    now_ms: u64,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    for (queue, outcome) in queues.iter().zip(outcomes) {
        if outcome.is_empty() {
            continue;
        }
        let dead_key = keys.dead(&queue.name);
        for dead in &outcome.dead {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&dead_key)
                .arg("MAXLEN")
                .arg("~")
                .arg(dead_max_length)
                .arg("*");
            for (name, value) in &dead.entry.fields {
                let own = DEAD_OWN_FIELDS
                    .iter()
                    .any(|own| own.as_bytes() == name.as_slice());
                if !own {
                    cmd.arg(name.as_slice()).arg(value.as_slice());
                }
            }
            cmd.arg("reason")
                .arg(dead.reason)
                .arg(field::ERROR)
                .arg(dead.error.as_slice())
                .arg("traceback")
                .arg(dead.traceback.as_slice())
                .arg("attempts")
                .arg(dead.attempts)
                .arg("failed_at")
                .arg(now_ms)
                .arg("origin_id")
                .arg(&dead.entry.entry_id);
            pipe.add_command(cmd).ignore();
        }
        if !outcome.finished.is_empty() {
            pipe.cmd("XACK")
                .arg(&queue.stream)
                .arg(group)
                .arg(&outcome.finished)
                .ignore();
            pipe.cmd("XDEL")
                .arg(&queue.stream)
                .arg(&outcome.finished)
                .ignore();
        }
        let stats = keys.stats(&queue.name);
        if outcome.processed > 0 {
            pipe.cmd("HINCRBY")
                .arg(&stats)
                .arg("processed")
                .arg(outcome.processed)
                .ignore();
        }
        if outcome.failed > 0 {
            pipe.cmd("HINCRBY")
                .arg(&stats)
                .arg("failed")
                .arg(outcome.failed)
                .ignore();
        }
    }
    pipe.query_async::<()>(connection).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk_value(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn read_reply_in_resp2_shape_is_parsed() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk_value("flumeq:{q}:stream"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk_value("1-0"),
                    Value::Array(vec![
                        bulk_value("id"),
                        bulk_value("a"),
                        bulk_value("type"),
                        bulk_value("t"),
                    ]),
                ]),
                Value::Array(vec![bulk_value("2-0"), Value::Nil]),
            ]),
        ])]);
        let parsed = parse_read_reply(reply);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, b"flumeq:{q}:stream".to_vec());
        assert_eq!(parsed[0].1.entry_id, "1-0");
        assert_eq!(parsed[0].1.get("type"), Some(&b"t"[..]));
        assert!(parsed[1].1.fields.is_empty());
    }

    #[test]
    fn timed_out_read_is_empty() {
        assert!(parse_read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn group_pending_picks_the_named_group() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk_value("name"),
                bulk_value("other"),
                bulk_value("pending"),
                Value::Int(7),
            ]),
            Value::Array(vec![
                bulk_value("name"),
                bulk_value("flumeq"),
                bulk_value("pending"),
                Value::Int(3),
            ]),
        ]);
        assert_eq!(group_pending(reply.clone(), "flumeq"), 3);
        assert_eq!(group_pending(reply, "missing"), 0);
    }
}
