//! The dispatcher's write connection: consumer groups, acks, dead letters,
//! counters. redis-rs `ConnectionManager` reconnects by itself; callers retry.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisResult, Value};

use super::{QueueOutcomes, QueueSpec};
use crate::envelope::{field, DEAD_LETTER_FIELDS};
use crate::keys::Keys;
use crate::scripts;

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

/// Tasks still somewhere in `queues`' streams: entries not yet delivered or
/// delivered and not acknowledged (in `group`, by any consumer). Done entries
/// are deleted, so `XLEN` counts the first kind and `XPENDING` the second
/// (including pending entries deleted meanwhile).
pub async fn tasks_in_streams(
    connection: &mut ConnectionManager,
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
}

fn add_fields<'a>(cmd: &mut Cmd, fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) {
    for (name, value) in fields {
        cmd.arg(name).arg(value);
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one MULTI block per queue, in the order Redis must apply it"
)]
/// Writes the outcomes of every queue in one pipeline: per queue one
/// MULTI/EXEC holding dead letters, scheduled retries, re-appended tasks,
/// `XACK` + `XDEL` of the finished entries, counters, done markers and
/// released unique keys. Either all of a queue's block happens or none.
pub async fn write_outcomes(
    connection: &mut ConnectionManager,
    keys: &Keys,
    queues: &[QueueSpec],
    settings: &WriteSettings,
    outcomes: &[QueueOutcomes],
    now_ms: u64,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    for (queue, outcome) in queues.iter().zip(outcomes) {
        if outcome.is_empty() {
            continue;
        }
        pipe.cmd("MULTI").ignore();
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
            pipe.add_command(cmd).ignore();
        }
        if !outcome.delayed.is_empty() {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(keys.delayed(&queue.name));
            for (due, member) in &outcome.delayed {
                cmd.arg(*due).arg(member);
            }
            pipe.add_command(cmd).ignore();
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
            pipe.add_command(cmd).ignore();
        }
        if !outcome.finished.is_empty() {
            let ids: Vec<&[u8]> = outcome.finished.iter().map(AsRef::as_ref).collect();
            pipe.cmd("XACK")
                .arg(&queue.stream)
                .arg(&settings.group)
                .arg(&ids)
                .ignore();
            pipe.cmd("XDEL").arg(&queue.stream).arg(&ids).ignore();
        }
        if !outcome.refresh.is_empty() {
            let ids: Vec<&[u8]> = outcome.refresh.iter().map(AsRef::as_ref).collect();
            pipe.cmd("EVAL")
                .arg(scripts::REFRESH_OWN)
                .arg(1)
                .arg(&queue.stream)
                .arg(&settings.group)
                .arg(&settings.consumer)
                .arg(&ids)
                .ignore();
        }
        let stats = keys.stats(&queue.name);
        for (name, count) in [
            ("processed", outcome.processed),
            ("failed", outcome.failed),
            ("retried", outcome.retried),
            ("skipped", outcome.skipped),
            ("dead", outcome.dead_count),
        ] {
            if count > 0 {
                pipe.cmd("HINCRBY")
                    .arg(&stats)
                    .arg(name)
                    .arg(count)
                    .ignore();
            }
        }
        for (kind, counts) in &outcome.by_type {
            for (name, count) in [
                ("processed", counts.processed),
                ("failed", counts.failed),
                ("retried", counts.retried),
                ("dead", counts.dead),
            ] {
                if count > 0 {
                    let mut field = Vec::with_capacity(name.len() + 1 + kind.len());
                    field.extend_from_slice(name.as_bytes());
                    field.push(b'|');
                    field.extend_from_slice(kind);
                    pipe.cmd("HINCRBY")
                        .arg(&stats)
                        .arg(field)
                        .arg(count)
                        .ignore();
                }
            }
        }
        if !outcome.durations.is_empty() {
            let key = keys.durations(&queue.name);
            for durations in &outcome.durations {
                pipe.cmd("HINCRBYFLOAT")
                    .arg(&key)
                    .arg(format!("{}|sum", durations.kind))
                    .arg(durations.sum)
                    .ignore();
                for (bucket, count) in &durations.buckets {
                    pipe.cmd("HINCRBY")
                        .arg(&key)
                        .arg(format!("{}|{bucket}", durations.kind))
                        .arg(*count)
                        .ignore();
                }
            }
        }
        for id in &outcome.done_ids {
            let key = keys.done(&queue.name, &String::from_utf8_lossy(id));
            pipe.cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(settings.processed_ttl_ms.max(1))
                .ignore();
        }
        for (key, owner) in &outcome.unlock {
            pipe.cmd("EVAL")
                .arg(scripts::RELEASE_UNIQUE)
                .arg(1)
                .arg(key)
                .arg(owner.as_ref())
                .ignore();
        }
        pipe.cmd("EXEC").ignore();
    }
    pipe.query_async::<()>(connection).await
}
