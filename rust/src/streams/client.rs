//! The synchronous store behind `flumeq.Client`.
//!
//! Synchronous on purpose: a `Client` starts no thread, so a process that
//! enqueues may still fork (the engine forks its actors).

use std::time::{Duration, Instant};

use redis::{ErrorKind, Pipeline, RedisResult, Script, ServerErrorKind, Value};

use crate::connection::{Endpoint, SyncConnection};
use crate::envelope::{delayed_member, TaskRef};
use crate::keys::{Keys, CANCEL_TTL_MS};
use crate::scripts;
use crate::streams::writer::ENDED_MAX_LENGTH;

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
    cancel_delayed: Script,
    cancel_scan: Script,
    release_unique: Script,
    trim_events: Script,
    ack_events: Script,
}

impl Default for ClientScripts {
    fn default() -> Self {
        Self {
            enqueue_unique: Script::new(scripts::ENQUEUE_UNIQUE),
            cron_tick: Script::new(scripts::CRON_TICK),
            cron_leases: Script::new(scripts::CRON_LEASES),
            requeue_dead: Script::new(scripts::REQUEUE_DEAD),
            purge_dead: Script::new(scripts::PURGE_DEAD),
            cancel_delayed: Script::new(scripts::CANCEL_DELAYED),
            cancel_scan: Script::new(scripts::CANCEL_SCAN),
            release_unique: Script::new(scripts::RELEASE_UNIQUE),
            trim_events: Script::new(scripts::TRIM_EVENTS),
            ack_events: Script::new(scripts::ACK_EVENTS),
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
    connection: &mut SyncConnection,
    keys: &Keys,
    queue: &str,
    invocation: &redis::ScriptInvocation<'_>,
) -> RedisResult<Option<String>> {
    if connection.is_cluster() {
        // The queue set is a key of its own slot: a call of its own. And a
        // lone script call is redirected by redis-rs (and loaded on
        // NOSCRIPT), where a pipeline's would not be.
        redis::cmd("SADD")
            .arg(keys.queues())
            .arg(queue)
            .query::<()>(connection)?;
        return invocation.invoke(connection);
    }
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

/// Entries of a stream (or members of a delayed set) one cancel script
/// looks at: about half a millisecond of Redis time.
const CANCEL_PAGE: usize = 1000;

/// Where a cancel found its task (counts of entries: a task id given
/// twice can be in several places).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// Removed from the delayed set, ended as cancelled.
    pub delayed: u64,
    /// Removed from the stream before any engine took it, ended as cancelled.
    pub ready: u64,
    /// Held by an engine (running or taken): a cancel record was written.
    pub held: u64,
}

/// Glob-escapes `text` for `MATCH`.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Cancels the delayed members of task `task_id` (found with `ZSCAN
/// MATCH` on its id field), adding their unique keys to `uniques`.
fn cancel_delayed(
    connection: &mut SyncConnection,
    keys: &Keys,
    scripts: &ClientScripts,
    queue: &str,
    task_id: &str,
    uniques: &mut Vec<String>,
) -> RedisResult<u64> {
    let delayed = keys.delayed(queue);
    // Members are JSON arrays of the fields: the id field is `"id","<id>"`.
    let id_json = serde_json::to_string(task_id).unwrap_or_default();
    let pattern = format!("*\"id\",{}*", glob_escape(&id_json));
    let mut cursor = 0u64;
    let mut members = Vec::new();
    loop {
        let (next, page): (u64, Vec<(Vec<u8>, String)>) = redis::cmd("ZSCAN")
            .arg(&delayed)
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(CANCEL_PAGE)
            .query(connection)?;
        members.extend(page.into_iter().map(|(member, _)| member));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut cancelled = 0;
    for member in members {
        let unique: Option<String> = scripts
            .cancel_delayed
            .key(&delayed)
            .key(keys.stats(queue))
            .key(keys.result(queue, task_id))
            .key(keys.ended(queue))
            .arg(member)
            .arg(task_id)
            .arg(ENDED_MAX_LENGTH)
            .invoke(connection)?;
        if let Some(unique) = unique {
            uniques.push(unique);
            cancelled += 1;
        }
    }
    Ok(cancelled)
}

/// The synchronous store the client uses.
pub struct SyncStore {
    endpoint: Endpoint,
    connection: Option<SyncConnection>,
    keys: Keys,
    scripts: ClientScripts,
    timeout: Duration,
    /// With Sentinel: the endpoint's generation when the connection was
    /// made, and when the sentinels were last asked where the master is.
    generation: u64,
    checked: Instant,
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
            generation: 0,
            checked: Instant::now(),
        })
    }

    fn connection(&mut self) -> RedisResult<&mut SyncConnection> {
        if self.connection.is_some()
            && self.endpoint.follows_failover()
            && self.checked.elapsed() >= crate::connection::MASTER_CHECK
        {
            // An old master still up takes writes until Sentinel demotes
            // it, and then drops them: follow the sentinels first.
            self.endpoint.check_master_sync();
            self.checked = Instant::now();
            if self.endpoint.generation() != self.generation {
                self.connection = None;
            }
        }
        if self.connection.is_none() {
            self.connection = Some(self.endpoint.connect_any_sync(self.timeout)?);
            self.generation = self.endpoint.generation();
            self.checked = Instant::now();
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
        mut call: impl FnMut(&mut SyncConnection, &Keys, &ClientScripts) -> RedisResult<T>,
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
        call: &mut impl FnMut(&mut SyncConnection, &Keys, &ClientScripts) -> RedisResult<T>,
        keys: &Keys,
        scripts: &ClientScripts,
        reused: bool,
    ) -> RedisResult<T> {
        let result = call(self.connection()?, keys, scripts);
        let Err(error) = &result else {
            return result;
        };
        let demoted = crate::connection::is_demoted(error);
        if !(error.is_io_error() || error.is_timeout() || error.is_connection_dropped() || demoted)
        {
            return result;
        }
        // A broken or timed-out connection may hold half a reply, and a
        // demoted master (after a failover) takes no writes: drop it. A
        // demoted node refused the command, so it is safe to send again.
        self.connection = None;
        if (reused || demoted) && !error.is_timeout() {
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
            let mut register = redis::pipe();
            register.cmd("SADD").arg(keys.queues()).arg(queue);
            count_enqueued(&mut register, &keys.stats(queue), tasks);
            let Some(connection) = connection.one() else {
                // Cluster: the queue set, the counts and each chunk of
                // entries are calls of their own (one slot each).
                connection.query_split(&register, false)?;
                let mut ids = Vec::with_capacity(tasks.len());
                for chunk in tasks.chunks(ENQUEUE_CHUNK) {
                    let mut pipe = redis::pipe();
                    for task in chunk {
                        push_xadd(&mut pipe, &stream, task);
                    }
                    for id in connection.query_split(&pipe, false)? {
                        ids.push(redis::from_redis_value(id)?);
                    }
                }
                return Ok(ids);
            };
            let mut ids = Vec::with_capacity(tasks.len());
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
                pipe.cmd("SADD").arg(keys.queues()).arg(queue);
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
                pipe.add_command(zadd);
                connection.query_split(&pipe, false)?;
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

    /// Cancels task `task_id` of `queue` wherever it is: a delayed one is
    /// removed from the delayed set and a ready one (no engine was given
    /// it) from the stream, both ended as cancelled at once; one an engine
    /// of `group` holds (running, or taken) gets a cancel record the
    /// engines act on. The delayed set is looked at before and after the
    /// stream, so a task that moves between them meanwhile is still found.
    /// Walks both in pages (Redis is never blocked long). Returns how many
    /// of its entries were delayed, ready and held.
    pub fn cancel(&mut self, queue: &str, task_id: &str, group: &str) -> RedisResult<Cancelled> {
        self.run(|connection, keys, scripts| {
            let mut found = Cancelled::default();
            let mut uniques = Vec::new();
            found.delayed +=
                cancel_delayed(connection, keys, scripts, queue, task_id, &mut uniques)?;
            let mut start = "-".to_owned();
            loop {
                let (deleted, recorded, next, keys_held): (u64, u64, String, Vec<String>) = scripts
                    .cancel_scan
                    .key(keys.stream(queue))
                    .key(keys.stats(queue))
                    .key(keys.result(queue, task_id))
                    .key(keys.ended(queue))
                    .key(keys.cancels(queue))
                    .arg(group)
                    .arg(task_id)
                    .arg(ENDED_MAX_LENGTH)
                    .arg(&start)
                    .arg(CANCEL_PAGE)
                    .arg(CANCEL_TTL_MS)
                    .invoke(connection)?;
                found.ready += deleted;
                found.held += recorded;
                uniques.extend(keys_held);
                if next.is_empty() {
                    break;
                }
                start = next;
            }
            if found.ready + found.held == 0 {
                // A retry may have moved it from the stream to the delayed
                // set while the stream was read.
                found.delayed +=
                    cancel_delayed(connection, keys, scripts, queue, task_id, &mut uniques)?;
            }
            for key in uniques.iter().filter(|key| !key.is_empty()) {
                scripts
                    .release_unique
                    .key(keys.unique(queue, key))
                    .arg(task_id)
                    .invoke::<i64>(connection)?;
            }
            Ok(found)
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

    /// Appends `count` task-history events (`events`, a JSON array) to
    /// `queue`'s events stream, then keeps the stream within `cap` events
    /// (`TRIM_EVENTS`). Returns the events dropped to keep it there.
    pub fn record_events(
        &mut self,
        queue: &str,
        count: u32,
        events: &[u8],
        cap: u64,
    ) -> RedisResult<u64> {
        self.run(|connection, keys, scripts| {
            let stream = keys.events(queue);
            let stats = keys.stats(queue);
            let mut pipe = redis::pipe();
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("n")
                .arg(count)
                .arg("events")
                .arg(events)
                .ignore();
            pipe.cmd("HINCRBY")
                .arg(&stats)
                .arg("history_buffered")
                .arg(count)
                .ignore();
            pipe.query::<()>(connection)?;
            scripts
                .trim_events
                .key(&stream)
                .key(&stats)
                .arg(cap)
                .invoke(connection)
        })
    }

    /// Acknowledges and deletes entries of `queue`'s events stream that a
    /// history process wrote (`ACK_EVENTS`): `(entry id, events)` pairs.
    /// Returns the events taken off the buffered count.
    pub fn ack_events(
        &mut self,
        queue: &str,
        group: &str,
        entries: &[(String, u32)],
    ) -> RedisResult<u64> {
        self.run(|connection, keys, scripts| {
            let mut invocation = scripts.ack_events.key(keys.events(queue));
            invocation.key(keys.stats(queue)).arg(group);
            for (id, count) in entries {
                invocation.arg(id).arg(*count);
            }
            invocation.invoke(connection)
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
            connection.query_split(&pipe, true)
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
