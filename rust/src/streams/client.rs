//! The synchronous store behind `flumeq.Client`.
//!
//! Synchronous on purpose: a `Client` starts no thread, so a process that
//! enqueues may still fork (the engine forks its actors).

use std::time::Duration;

use redis::{ErrorKind, Pipeline, RedisResult, Script, ServerErrorKind, Value};

use crate::connection::Endpoint;
use crate::envelope::{delayed_member, TaskRef};
use crate::keys::Keys;
use crate::scripts;

/// Entries per pipeline when enqueueing many tasks: large enough to amortise
/// the round trip, small enough to keep Redis' query buffer modest.
const ENQUEUE_CHUNK: usize = 2000;

/// Adds `XADD stream * field value ...` for `task` to `pipe`.
fn push_xadd(pipe: &mut Pipeline, stream: &str, task: &TaskRef<'_>) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in task.to_fields() {
        cmd.arg(name).arg(value);
    }
    pipe.add_command(cmd);
}

/// Reads `count` XADD replies (entry ids) into `ids`.
fn read_ids(
    connection: &mut redis::Connection,
    count: usize,
    ids: &mut Vec<String>,
) -> RedisResult<()> {
    for _ in 0..count {
        ids.push(redis::from_redis_value(connection.recv_response()?)?);
    }
    Ok(())
}

/// Adds the counting of `tasks` to the queue's stats hash (`enqueued`, and
/// `enqueued|<type>` per type) to `pipe`.
fn count_enqueued(pipe: &mut redis::Pipeline, stats: &str, tasks: &[TaskRef<'_>]) {
    let mut per_type: Vec<(&str, u64)> = Vec::new();
    for task in tasks {
        match per_type.iter_mut().find(|(kind, _)| *kind == task.kind) {
            Some((_, count)) => *count += 1,
            None => per_type.push((task.kind, 1)),
        }
    }
    pipe.cmd("HINCRBY")
        .arg(stats)
        .arg("enqueued")
        .arg(tasks.len());
    for (kind, count) in per_type {
        pipe.cmd("HINCRBY")
            .arg(stats)
            .arg(format!("enqueued|{kind}"))
            .arg(count);
    }
}

/// The client's Lua scripts, called by SHA (`EVALSHA`) and loaded when
/// Redis does not know them (`NOSCRIPT`: it restarted, or was flushed).
struct ClientScripts {
    enqueue_unique: Script,
    cron_tick: Script,
    cron_leases: Script,
    requeue_dead: Script,
    purge_dead: Script,
}

impl Default for ClientScripts {
    fn default() -> Self {
        Self {
            enqueue_unique: Script::new(scripts::ENQUEUE_UNIQUE),
            cron_tick: Script::new(scripts::CRON_TICK),
            cron_leases: Script::new(scripts::CRON_LEASES),
            requeue_dead: Script::new(scripts::REQUEUE_DEAD),
            purge_dead: Script::new(scripts::PURGE_DEAD),
        }
    }
}

fn is_no_script(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Registers `queue` and runs `invocation` (a script whose reply is an
/// entry id or nil) in one pipeline; loads the script when Redis does not
/// know it (then nothing was written: the script never ran) and retries.
fn registered_script(
    connection: &mut redis::Connection,
    keys: &Keys,
    queue: &str,
    invocation: &redis::ScriptInvocation<'_>,
) -> RedisResult<Option<String>> {
    let mut pipe = redis::pipe();
    pipe.cmd("SADD").arg(keys.queues()).arg(queue).ignore();
    pipe.invoke_script(invocation);
    let (reply,): (Option<String>,) = match pipe.query(connection) {
        Err(error) if is_no_script(&error) => {
            invocation.load(connection)?;
            pipe.query(connection)?
        }
        other => other?,
    };
    Ok(reply)
}

/// The synchronous store the client uses.
pub struct SyncStore {
    endpoint: Endpoint,
    connection: Option<redis::Connection>,
    keys: Keys,
    scripts: ClientScripts,
    timeout: Duration,
}

impl SyncStore {
    /// A store for `url`; connects lazily.
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, crate::connection::UrlError> {
        Ok(Self {
            endpoint: Endpoint::parse(url)?,
            connection: None,
            keys: Keys::new(prefix),
            scripts: ClientScripts::default(),
            timeout,
        })
    }

    fn connection(&mut self) -> RedisResult<&mut redis::Connection> {
        if self.connection.is_none() {
            self.connection = Some(self.endpoint.connect_sync(self.timeout)?);
        }
        match self.connection.as_mut() {
            Some(connection) => Ok(connection),
            None => unreachable!("connection set above"),
        }
    }

    /// Runs `call` on the connection. A reused connection found dead (Redis
    /// restarted, idle socket closed) is replaced and the call made once more
    /// on a fresh one; a timeout is not retried (the command may be running).
    fn run<T>(
        &mut self,
        mut call: impl FnMut(&mut redis::Connection, &Keys, &ClientScripts) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let reused = self.connection.is_some();
        let keys = self.keys.clone();
        let scripts = std::mem::take(&mut self.scripts);
        let result = self.run_once(&mut call, &keys, &scripts, reused);
        self.scripts = scripts;
        result
    }

    fn run_once<T>(
        &mut self,
        call: &mut impl FnMut(&mut redis::Connection, &Keys, &ClientScripts) -> RedisResult<T>,
        keys: &Keys,
        scripts: &ClientScripts,
        reused: bool,
    ) -> RedisResult<T> {
        let result = call(self.connection()?, keys, scripts);
        let Err(error) = &result else {
            return result;
        };
        if !(error.is_io_error() || error.is_timeout() || error.is_connection_dropped()) {
            return result;
        }
        // A broken or timed-out connection may hold half a reply: drop it.
        self.connection = None;
        if reused && !error.is_timeout() {
            return call(self.connection()?, keys, scripts);
        }
        result
    }

    /// Drops the connection; the next call makes a new one.
    pub fn disconnect(&mut self) {
        self.connection = None;
    }

    /// Round trip check.
    pub fn ping(&mut self) -> RedisResult<()> {
        self.run(|connection, _, _| redis::cmd("PING").query::<()>(connection))
    }

    /// Appends `tasks` to `queue`'s stream; returns their entry ids.
    ///
    /// Chunks of `ENQUEUE_CHUNK` commands are sent back to back: chunk k+1 is
    /// packed and written while Redis still works on chunk k, and chunk k's
    /// replies are read only then, so client and server work overlap.
    pub fn enqueue(&mut self, queue: &str, tasks: &[TaskRef<'_>]) -> RedisResult<Vec<String>> {
        self.run(|connection, keys, _| {
            let stream = keys.stream(queue);
            let mut ids = Vec::with_capacity(tasks.len());
            let mut register = redis::pipe();
            register.cmd("SADD").arg(keys.queues()).arg(queue);
            count_enqueued(&mut register, &keys.stats(queue), tasks);
            let register_replies = register.cmd_iter().count();
            connection.send_packed_command(&register.get_packed_pipeline())?;
            let mut unread_register = true;
            let mut unread: Option<usize> = None;
            for chunk in tasks.chunks(ENQUEUE_CHUNK) {
                let mut pipe = redis::pipe();
                for task in chunk {
                    push_xadd(&mut pipe, &stream, task);
                }
                connection.send_packed_command(&pipe.get_packed_pipeline())?;
                if unread_register {
                    for _ in 0..register_replies {
                        redis::from_redis_value::<Value>(connection.recv_response()?)?;
                    }
                    unread_register = false;
                }
                if let Some(count) = unread.replace(chunk.len()) {
                    read_ids(connection, count, &mut ids)?;
                }
            }
            if unread_register {
                for _ in 0..register_replies {
                    redis::from_redis_value::<Value>(connection.recv_response()?)?;
                }
            }
            if let Some(count) = unread {
                read_ids(connection, count, &mut ids)?;
            }
            Ok(ids)
        })
    }

    /// Schedules `tasks` for `due_ms` (ms since the epoch) in the queue's
    /// delayed ZSET; the dispatcher's mover appends them to the stream then.
    pub fn schedule(&mut self, queue: &str, tasks: &[TaskRef<'_>], due_ms: u64) -> RedisResult<()> {
        self.run(|connection, keys, _| {
            let delayed = keys.delayed(queue);
            for chunk in tasks.chunks(ENQUEUE_CHUNK) {
                let mut pipe = redis::pipe();
                pipe.cmd("SADD").arg(keys.queues()).arg(queue).ignore();
                count_enqueued(&mut pipe, &keys.stats(queue), chunk);
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(&delayed);
                for task in chunk {
                    let fields = task.to_fields();
                    let member = delayed_member(
                        fields
                            .iter()
                            .map(|(name, value)| (name.as_bytes(), value.as_slice())),
                    );
                    zadd.arg(due_ms).arg(member);
                }
                pipe.add_command(zadd).ignore();
                pipe.query::<()>(connection)?;
            }
            Ok(())
        })
    }

    /// Enqueues (or, with `due_ms > 0`, schedules) one task holding a unique
    /// key, in one script: nothing is written when the key is held. Returns
    /// the entry id (`""` when scheduled), or `None` for a duplicate.
    pub fn enqueue_unique(
        &mut self,
        queue: &str,
        task: &TaskRef<'_>,
        key: &str,
        ttl_ms: u64,
        due_ms: u64,
    ) -> RedisResult<Option<String>> {
        self.run(|connection, keys, scripts| {
            let fields = task.to_fields();
            let member = delayed_member(
                fields
                    .iter()
                    .map(|(name, value)| (name.as_bytes(), value.as_slice())),
            );
            let mut invocation = scripts.enqueue_unique.prepare_invoke();
            invocation
                .key(keys.unique(queue, key))
                .key(keys.stream(queue))
                .key(keys.delayed(queue))
                .key(keys.stats(queue))
                .arg(task.id)
                .arg(ttl_ms.max(1))
                .arg(due_ms)
                .arg(member)
                .arg(task.kind);
            for (name, value) in &fields {
                invocation.arg(*name).arg(value.as_slice());
            }
            registered_script(connection, keys, queue, &invocation)
        })
    }

    /// Appends the tick `tick_ms` of cron entry `entry` (`task`), unless
    /// that tick or a later one of the entry was appended already (then
    /// `None`, nothing written). One script; registers the queue too.
    pub fn enqueue_tick(
        &mut self,
        queue: &str,
        task: &TaskRef<'_>,
        entry: &str,
        tick_ms: u64,
    ) -> RedisResult<Option<String>> {
        self.run(|connection, keys, scripts| {
            let fields = task.to_fields();
            let mut invocation = scripts.cron_tick.prepare_invoke();
            invocation
                .key(keys.cron_ticks(queue))
                .key(keys.stream(queue))
                .key(keys.stats(queue))
                .arg(entry)
                .arg(tick_ms)
                .arg(task.kind);
            for (name, value) in &fields {
                invocation.arg(*name).arg(value.as_slice());
            }
            registered_script(connection, keys, queue, &invocation)
        })
    }

    /// Takes or keeps (`ttl_ms`; 0 lets go) the scheduler leases of cron
    /// `entries` for `holder`; returns which it holds.
    pub fn cron_leases(
        &mut self,
        entries: &[String],
        holder: &str,
        ttl_ms: u64,
    ) -> RedisResult<Vec<bool>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.run(|connection, keys, scripts| {
            let mut invocation = scripts.cron_leases.prepare_invoke();
            for entry in entries {
                invocation.key(keys.cron_lease(entry));
            }
            invocation.arg(holder).arg(ttl_ms);
            let held: Vec<i64> = match invocation.invoke(connection) {
                Err(error) if is_no_script(&error) => {
                    invocation.load(connection)?;
                    invocation.invoke(connection)?
                }
                other => other?,
            };
            Ok(held.into_iter().map(|flag| flag == 1).collect())
        })
    }

    /// Ids of tasks that ended after `cursor` on `queue`'s `ended` stream,
    /// waiting up to `block_ms` for the first; and the cursor to go on from.
    /// An empty `cursor` gives the stream's last id at once (`0-0` when
    /// empty), for a waiter to start from before it looks for its record.
    pub fn read_ended(
        &mut self,
        queue: &str,
        cursor: &str,
        block_ms: u64,
        count: usize,
    ) -> RedisResult<(String, Vec<String>)> {
        let timeout = self.timeout;
        self.run(|connection, keys, _| {
            let stream = keys.ended(queue);
            if cursor.is_empty() {
                let last: Vec<(String, Value)> = redis::cmd("XREVRANGE")
                    .arg(&stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query(connection)?;
                let last = last.into_iter().next().map(|(id, _)| id);
                return Ok((last.unwrap_or_else(|| "0-0".to_owned()), Vec::new()));
            }
            // The block may outlast the client's timeout: wait for it plus
            // the usual reply time.
            connection.set_read_timeout(Some(timeout + Duration::from_millis(block_ms)))?;
            let reply: RedisResult<Value> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(count.max(1))
                .arg("BLOCK")
                .arg(block_ms.max(1))
                .arg("STREAMS")
                .arg(&stream)
                .arg(cursor)
                .query(connection);
            connection.set_read_timeout(Some(timeout))?;
            Ok(ended_ids(reply?, cursor))
        })
    }

    /// Moves dead letters back to the stream with attempt 0: those whose task
    /// id is in `ids`, or all when `ids` is empty. Walks the dead-letter stream
    /// in steps of 500 so Redis is never blocked long. Returns the count moved.
    pub fn requeue_dead(&mut self, queue: &str, ids: &[String]) -> RedisResult<u64> {
        self.run(|connection, keys, scripts| {
            let mut cursor = "-".to_owned();
            let mut moved = 0;
            loop {
                let (count, next): (u64, String) = scripts
                    .requeue_dead
                    .key(keys.dead(queue))
                    .key(keys.stream(queue))
                    .arg(&cursor)
                    .arg(500)
                    .arg(ids)
                    .invoke(connection)?;
                moved += count;
                if next.is_empty() {
                    return Ok(moved);
                }
                cursor = next;
            }
        })
    }

    /// Deletes every dead letter of `queue`; returns how many there were.
    pub fn purge_dead(&mut self, queue: &str) -> RedisResult<u64> {
        self.run(|connection, keys, scripts| {
            scripts.purge_dead.key(keys.dead(queue)).invoke(connection)
        })
    }

    /// Runs `commands` (each a list of arguments) in one non-transactional
    /// pipeline for the admin tools. A command Redis refuses comes back as a
    /// `Value::ServerError` in its place; the others still run.
    pub fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> RedisResult<Vec<Value>> {
        self.run(|connection, _, _| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for command in commands {
                let Some((name, args)) = command.split_first() else {
                    continue;
                };
                pipe.cmd(&String::from_utf8_lossy(name));
                for arg in args {
                    pipe.arg(arg.as_slice());
                }
            }
            pipe.query(connection)
        })
    }
}

/// The ids in an `XREAD` reply of one `ended` stream, and the last entry id
/// (`cursor` when there was none).
fn ended_ids(reply: Value, cursor: &str) -> (String, Vec<String>) {
    let mut last = cursor.to_owned();
    let mut ids = Vec::new();
    // RESP2: [[stream, entries]]; RESP3: {stream: entries}.
    let lists: Vec<Value> = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        _ => return (last, ids),
    };
    for entries in lists {
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Ok((entry_id, fields)) =
                redis::from_redis_value::<(String, Vec<(String, String)>)>(entry)
            else {
                continue;
            };
            last = entry_id;
            ids.extend(
                fields
                    .into_iter()
                    .filter(|(name, _)| name == "id")
                    .map(|(_, id)| id),
            );
        }
    }
    (last, ids)
}
