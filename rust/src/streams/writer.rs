//! The dispatcher's write commands: consumer groups, and the outcomes of
//! finished tasks (acks, dead letters, retries, counters) in one pipeline.

use crate::connection::Link;
use redis::{Cmd, RedisError, RedisResult, Value};

use super::{QueueOutcomes, QueueSpec};
use crate::envelope::{field, DEAD_LETTER_FIELDS};
use crate::keys::Keys;
use crate::scripts;

/// How long the write marker of a queue lives (ms): far longer than any
/// replay waits, and removed at a graceful stop anyway.
pub const WRITTEN_MARKER_TTL_MS: u64 = 24 * 3600 * 1000;

/// Approximate bound of each queue's `ended` stream (the waiters' wake-up
/// stream): a waiter that falls this far behind finds its task's record by
/// its periodic re-check instead.
pub const ENDED_MAX_LENGTH: usize = 10_000;

/// Creates the consumer group of every queue (at id 0, so tasks enqueued
/// before the first engine started are served) and registers the queues.
pub async fn ensure_groups(
    connection: &mut Link,
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

/// Tasks still somewhere in `queues`' streams: entries not yet delivered or
/// delivered and not acknowledged (in `group`, by any consumer). Done entries
/// are removed right after their ack (`TRIM_DONE`), so `XLEN` counts the
/// first kind and `XPENDING` the second
/// (including pending entries deleted meanwhile).
pub async fn tasks_in_streams(
    connection: &mut Link,
    queues: &[QueueSpec],
    group: &str,
) -> RedisResult<u64> {
    let mut pipe = redis::pipe();
    for queue in queues {
        pipe.cmd("XLEN").arg(&queue.stream);
        pipe.cmd("XPENDING").arg(&queue.stream).arg(group);
    }
    let replies: Vec<Value> = pipe.query_async(connection).await?;
    Ok(replies
        .iter()
        .map(|reply| match reply {
            Value::Int(length) => (*length).max(0) as u64,
            Value::Array(summary) => match summary.first() {
                Some(Value::Int(count)) => (*count).max(0) as u64,
                _ => 0,
            },
            _ => 0,
        })
        .sum())
}

/// How outcomes are written: settings of the engine.
#[derive(Debug, Clone)]
pub struct WriteSettings {
    /// Consumer group.
    pub group: String,
    /// This engine's consumer name (for refreshing its own entries).
    pub consumer: String,
    /// Approximate bound of each dead-letter stream.
    pub dead_max_length: usize,
    /// How long done markers live, ms.
    pub processed_ttl_ms: u64,
    /// Most task-history events each queue's events stream holds.
    pub history_buffer: u64,
    /// Most summaries of completed tasks each queue keeps.
    pub retention_max_length: u64,
    /// The scripts a write calls.
    pub scripts: WriteScripts,
}

/// One attempt at writing a set of outcomes.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// The set's sequence number (one per set, the same for every attempt).
    pub seq: u64,
    /// An earlier attempt failed: skip the blocks it applied.
    pub replay: bool,
}

/// The scripts an outcome write may call (by SHA, loaded on `NOSCRIPT`).
#[derive(Debug, Clone)]
pub struct WriteScripts {
    refresh: redis::Script,
    release: redis::Script,
    trim_events: redis::Script,
    prune_completed: redis::Script,
    trim_done: redis::Script,
}

impl Default for WriteScripts {
    fn default() -> Self {
        Self {
            refresh: redis::Script::new(scripts::REFRESH_OWN),
            release: redis::Script::new(scripts::RELEASE_UNIQUE),
            trim_events: redis::Script::new(scripts::TRIM_EVENTS),
            prune_completed: redis::Script::new(scripts::PRUNE_COMPLETED),
            trim_done: redis::Script::new(scripts::TRIM_DONE),
        }
    }
}

impl WriteScripts {
    /// Loads the scripts (after Redis said `NOSCRIPT`: it restarted, or its
    /// script cache was flushed). One command each: on a cluster a lone
    /// `SCRIPT LOAD` goes to every master (a pipeline would go to one).
    pub async fn load(&self, connection: &mut Link) -> RedisResult<()> {
        self.refresh.prepare_invoke().load_async(connection).await?;
        self.release.prepare_invoke().load_async(connection).await?;
        for script in [&self.trim_events, &self.prune_completed, &self.trim_done] {
            script.prepare_invoke().load_async(connection).await?;
        }
        Ok(())
    }
}

/// Why a write of outcomes failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Redis did not answer, or refused the pipeline; retry it.
    #[error("{0}")]
    Redis(#[from] RedisError),
    /// A script was not in Redis' cache: load the scripts, then retry.
    #[error("redis lost its scripts (NOSCRIPT)")]
    NoScript,
    /// Redis refused a transaction for a reason no retry mends (a command
    /// it cannot queue): retrying would block every later outcome.
    #[error("redis refused an outcome transaction: {0}")]
    Refused(String),
}

/// Error codes that make Redis refuse to queue a command for a while only
/// (memory, loading, a failover...): the transaction is worth retrying.
const PASSING: [&str; 9] = [
    "OOM",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "READONLY",
    "NOREPLICAS",
    "MISCONF",
    "TRYAGAIN",
    "CLUSTERDOWN",
];

fn add_fields<'a>(cmd: &mut Cmd, fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) {
    for (name, value) in fields {
        cmd.arg(name).arg(value);
    }
}

/// Adds one queue's MULTI/EXEC block to `pipe`: its outcomes, with their
/// finished ids in stream order; `marker` is set inside it.
#[expect(
    clippy::too_many_lines,
    reason = "one MULTI block per queue, in the order Redis must apply it"
)]
fn add_block(
    pipe: &mut redis::Pipeline,
    keys: &Keys,
    queue: &QueueSpec,
    settings: &WriteSettings,
    (outcome, finished): (&QueueOutcomes, &[&[u8]]),
    now_ms: u64,
    marker: (&str, u64),
) {
    pipe.cmd("MULTI");
    let dead_key = keys.dead(&queue.name);
    for dead in &outcome.dead {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&dead_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(settings.dead_max_length)
            .arg("*");
        add_fields(
            &mut cmd,
            dead.entry
                .fields
                .iter()
                .filter(|(name, _)| {
                    !DEAD_LETTER_FIELDS
                        .iter()
                        .any(|own| own.as_bytes() == name.as_ref())
                })
                .map(|(name, value)| (name.as_ref(), value.as_ref())),
        );
        cmd.arg(field::REASON)
            .arg(dead.reason)
            .arg(field::ERROR)
            .arg(dead.error.as_slice())
            .arg(field::TRACEBACK)
            .arg(dead.traceback.as_slice())
            .arg(field::ATTEMPTS)
            .arg(dead.attempts)
            .arg(field::FAILED_AT)
            .arg(now_ms)
            .arg(field::ORIGIN_ID)
            .arg(dead.entry.entry_id.as_ref());
        pipe.add_command(cmd);
    }
    if !outcome.delayed.is_empty() {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(keys.delayed(&queue.name));
        for (due, member) in &outcome.delayed {
            cmd.arg(*due).arg(member);
        }
        pipe.add_command(cmd);
    }
    for fields in &outcome.append {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&queue.stream).arg("*");
        add_fields(
            &mut cmd,
            fields
                .iter()
                .map(|(name, value)| (name.as_ref(), value.as_ref())),
        );
        pipe.add_command(cmd);
    }
    if !finished.is_empty() {
        // Removed from the stream after the transaction (`TRIM_DONE`).
        pipe.cmd("XACK")
            .arg(&queue.stream)
            .arg(&settings.group)
            .arg(finished);
    }
    let stats = keys.stats(&queue.name);
    for (name, count) in [
        ("processed", outcome.processed),
        ("failed", outcome.failed),
        ("retried", outcome.retried),
        ("skipped", outcome.skipped),
        ("dead", outcome.dead_count),
        ("cancelled", outcome.cancelled),
        ("throttled", outcome.throttled),
    ] {
        if count > 0 {
            pipe.cmd("HINCRBY").arg(&stats).arg(name).arg(count);
        }
    }
    for (kind, counts) in &outcome.by_type {
        for (name, count) in [
            ("processed", counts.processed),
            ("failed", counts.failed),
            ("retried", counts.retried),
            ("dead", counts.dead),
            ("cancelled", counts.cancelled),
            ("throttled", counts.throttled),
        ] {
            if count > 0 {
                let mut field = Vec::with_capacity(name.len() + 1 + kind.len());
                field.extend_from_slice(name.as_bytes());
                field.push(b'|');
                field.extend_from_slice(kind);
                pipe.cmd("HINCRBY").arg(&stats).arg(field).arg(count);
            }
        }
    }
    if !outcome.durations.is_empty() {
        let key = keys.durations(&queue.name);
        for durations in &outcome.durations {
            pipe.cmd("HINCRBYFLOAT")
                .arg(&key)
                .arg(format!("{}|sum", durations.kind))
                .arg(durations.sum);
            for (bucket, count) in &durations.buckets {
                pipe.cmd("HINCRBY")
                    .arg(&key)
                    .arg(format!("{}|{bucket}", durations.kind))
                    .arg(*count);
            }
        }
    }
    for id in &outcome.done_ids {
        let key = keys.done(&queue.name, &String::from_utf8_lossy(id));
        pipe.cmd("SET")
            .arg(key)
            .arg(1)
            .arg("PX")
            .arg(settings.processed_ttl_ms.max(1));
    }
    if !outcome.ended.is_empty() {
        let ended = keys.ended(&queue.name);
        for kept in &outcome.ended {
            let key = keys.result(&queue.name, &String::from_utf8_lossy(&kept.id));
            // A record of an earlier end (a dead letter since requeued) goes.
            pipe.cmd("DEL").arg(&key);
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&key)
                .arg("state")
                .arg(kept.state)
                .arg("attempts")
                .arg(kept.attempts)
                .arg("finished_at")
                .arg(now_ms);
            if kept.state == "succeeded" {
                cmd.arg("value").arg(kept.value.as_slice());
            } else {
                cmd.arg(field::REASON)
                    .arg(kept.reason)
                    .arg(field::ERROR)
                    .arg(kept.error.as_slice())
                    .arg(field::TRACEBACK)
                    .arg(kept.traceback.as_slice());
            }
            pipe.add_command(cmd);
            pipe.cmd("PEXPIRE").arg(&key).arg(kept.ttl_ms.max(1));
            pipe.cmd("XADD")
                .arg(&ended)
                .arg("MAXLEN")
                .arg("~")
                .arg(ENDED_MAX_LENGTH)
                .arg("*")
                .arg(field::ID)
                .arg(kept.id.as_ref());
        }
    }
    if !outcome.completed.is_empty() {
        // Pruned to their bound after the transaction (`PRUNE_COMPLETED`).
        let mut summaries = redis::cmd("HSET");
        let mut expiries = redis::cmd("ZADD");
        summaries.arg(keys.completed(&queue.name));
        expiries.arg(keys.completed_expiry(&queue.name));
        for completed in &outcome.completed {
            summaries
                .arg(completed.id.as_ref())
                .arg(completed.summary.as_slice());
            expiries
                .arg(completed.expires_ms)
                .arg(completed.id.as_ref());
        }
        pipe.add_command(summaries);
        pipe.add_command(expiries);
    }
    if !outcome.events.is_empty() {
        // Trimmed to their bound after the transaction (`TRIM_EVENTS`).
        pipe.cmd("XADD")
            .arg(keys.events(&queue.name))
            .arg("*")
            .arg("n")
            .arg(outcome.events.count)
            .arg("events")
            .arg(outcome.events.to_json());
        pipe.cmd("HINCRBY")
            .arg(&stats)
            .arg("history_buffered")
            .arg(outcome.events.count);
    }
    pipe.cmd("SET")
        .arg(marker.0)
        .arg(marker.1)
        .arg("PX")
        .arg(WRITTEN_MARKER_TTL_MS);
    pipe.cmd("EXEC");
}

/// Writes the outcomes of every queue in one pipeline.
///
/// Per queue, one MULTI/EXEC holds dead letters, scheduled retries,
/// re-appended tasks, `XACK` + `XDEL` of the finished entries, counters and
/// done markers: either all of a queue's block happens or none. The block
/// also sets the queue's write marker to `seq`. After a failure the caller
/// calls again with `replay`: blocks whose marker already holds `seq` were
/// applied (only their reply was lost) and are skipped, so a replay never
/// appends a task or counts it twice. Unique-key releases and refreshes of
/// held entries follow the blocks as scripts; they are safe to repeat.
pub async fn write_outcomes(
    connection: &mut Link,
    keys: &Keys,
    queues: &[QueueSpec],
    settings: &WriteSettings,
    outcomes: &[QueueOutcomes],
    now_ms: u64,
    attempt: Attempt,
) -> Result<(), WriteError> {
    let Attempt { seq, replay } = attempt;
    let scripts = &settings.scripts;
    let blocks: Vec<(usize, String)> = queues
        .iter()
        .zip(outcomes)
        .enumerate()
        .filter(|(_, (_, outcome))| outcome.needs_block())
        .map(|(at, (queue, _))| (at, keys.written(&queue.name, &settings.consumer)))
        .collect();
    let mut applied = vec![false; blocks.len()];
    if replay && !blocks.is_empty() {
        let mut pipe = redis::pipe();
        for (_, marker) in &blocks {
            pipe.cmd("GET").arg(marker);
        }
        let markers: Vec<Option<u64>> = pipe.query_async(connection).await?;
        for (done, marker) in applied.iter_mut().zip(markers) {
            *done = marker == Some(seq);
        }
    }
    // Each queue's finished ids in stream order, for its XACK and its trim.
    let finished: Vec<Vec<&[u8]>> = outcomes
        .iter()
        .map(|outcome| in_stream_order(&outcome.finished))
        .collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for ((at, marker), done) in blocks.iter().zip(&applied) {
        if !done {
            add_block(
                &mut pipe,
                keys,
                &queues[*at],
                settings,
                (&outcomes[*at], &finished[*at]),
                now_ms,
                (marker, seq),
            );
        }
    }
    for ((queue, outcome), ids) in queues.iter().zip(outcomes).zip(&finished) {
        if !ids.is_empty() {
            pipe.invoke_script(
                scripts
                    .trim_done
                    .key(&queue.stream)
                    .key(keys.written(&queue.name, &settings.consumer))
                    .arg(seq)
                    .arg(ids),
            );
        }
        if !outcome.refresh.is_empty() {
            let ids: Vec<&[u8]> = outcome.refresh.iter().map(AsRef::as_ref).collect();
            pipe.invoke_script(
                scripts
                    .refresh
                    .key(&queue.stream)
                    .arg(&settings.group)
                    .arg(&settings.consumer)
                    .arg(&ids),
            );
        }
        for (key, owner) in &outcome.unlock {
            pipe.invoke_script(scripts.release.key(key).arg(owner.as_ref()));
        }
        if !outcome.completed.is_empty() {
            pipe.invoke_script(
                scripts
                    .prune_completed
                    .key(keys.completed(&queue.name))
                    .key(keys.completed_expiry(&queue.name))
                    .arg(now_ms)
                    .arg(settings.retention_max_length),
            );
        }
        if !outcome.events.is_empty() {
            pipe.invoke_script(
                scripts
                    .trim_events
                    .key(keys.events(&queue.name))
                    .key(keys.stats(&queue.name))
                    .arg(settings.history_buffer),
            );
        }
    }
    if pipe.cmd_iter().next().is_none() {
        return Ok(());
    }
    let replies: Vec<Value> = pipe.query_async(connection).await?;
    check_replies(&replies)
}

/// `ids` in the order of their stream (mostly already so: one read's
/// batches finish in order; each id is parsed once when they are not).
fn in_stream_order(ids: &[bytes::Bytes]) -> Vec<&[u8]> {
    let mut ordered: Vec<&[u8]> = ids.iter().map(AsRef::as_ref).collect();
    if !ordered.is_sorted_by_key(|id| entry_order(id)) {
        ordered.sort_by_cached_key(|id| entry_order(id));
    }
    ordered
}

/// The order of a stream entry id (`<ms>-<seq>`) in its stream.
fn entry_order(id: &[u8]) -> (u64, u64) {
    let number = |digits: &[u8]| {
        digits.iter().fold(0u64, |value, digit| {
            value
                .saturating_mul(10)
                .saturating_add(u64::from(digit.wrapping_sub(b'0')))
        })
    };
    match id.iter().position(|byte| *byte == b'-') {
        Some(dash) => (number(&id[..dash]), number(&id[dash + 1..])),
        None => (number(id), 0),
    }
}

/// Finds what went wrong in a pipeline's replies: a `NOSCRIPT` (load and
/// retry), an aborted transaction (retried when the cause passes, refused
/// otherwise), or an error inside an applied transaction (logged: the data
/// is in a shape no retry can mend).
fn check_replies(replies: &[Value]) -> Result<(), WriteError> {
    let mut no_script = false;
    // Errors of commands refused at queueing time, since the last EXEC.
    let mut refused: Vec<String> = Vec::new();
    for reply in replies {
        match reply {
            Value::ServerError(error) if error.code() == "NOSCRIPT" => no_script = true,
            Value::ServerError(error) if error.code() == "EXECABORT" => {
                if refused.iter().any(|code| PASSING.contains(&code.as_str())) || refused.is_empty()
                {
                    return Err(WriteError::Redis(RedisError::from(error.clone())));
                }
                return Err(WriteError::Refused(refused.join("; ")));
            }
            Value::ServerError(error) => {
                // MULTI answers OK and queued commands QUEUED; an error here
                // was refused at queueing time, and EXEC then aborts.
                refused.push(error.code().to_owned());
                log::debug!("outcome write: {}", error.details().unwrap_or("error"));
            }
            Value::Array(results) => {
                refused.clear();
                for result in results {
                    if let Value::ServerError(error) = result {
                        log::warn!(
                            "an outcome command failed inside its transaction ({}: {}); \
                             the rest was applied",
                            error.code(),
                            error.details().unwrap_or("")
                        );
                    }
                }
            }
            _ => {}
        }
    }
    if no_script {
        return Err(WriteError::NoScript);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::in_stream_order;
    use bytes::Bytes;

    #[test]
    fn entry_ids_sort_as_the_stream_orders_them() {
        let ids: Vec<Bytes> = ["10-0", "9-5", "5-10", "5-9", "1796414740003-2"]
            .into_iter()
            .map(|id| Bytes::from_static(id.as_bytes()))
            .collect();
        let expected: Vec<&[u8]> = vec![b"5-9", b"5-10", b"9-5", b"10-0", b"1796414740003-2"];
        assert_eq!(in_stream_order(&ids), expected);
    }
}
