//! The dispatcher's write connection: consumer groups, acks, dead letters,
//! counters. redis-rs `ConnectionManager` reconnects by itself; callers retry.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Value};

use super::{QueueOutcomes, QueueSpec};
use crate::envelope::field;
use crate::keys::Keys;

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
                    .any(|own| own.as_bytes() == name.as_ref());
                if !own {
                    cmd.arg(name.as_ref()).arg(value.as_ref());
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
                .arg(dead.entry.entry_id.as_ref());
            pipe.add_command(cmd).ignore();
        }
        if !outcome.finished.is_empty() {
            let ids: Vec<&[u8]> = outcome.finished.iter().map(AsRef::as_ref).collect();
            pipe.cmd("XACK")
                .arg(&queue.stream)
                .arg(group)
                .arg(&ids)
                .ignore();
            pipe.cmd("XDEL").arg(&queue.stream).arg(&ids).ignore();
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
