//! The dispatcher's read commands, on zero-copy connections (the hot path):
//! new entries, this consumer's own pending entries, done-marker checks and
//! delivery counts.

use redis::Cmd;
use redis_protocol::resp2::types::BytesFrame;

use super::{reply, QueueSpec};
use crate::connection::{RawConnection, RawError};
use crate::envelope::RawEntry;

/// The read connection type (kept under the name callers know).
pub type Reader = RawConnection;
/// Why a read failed.
pub type ReadError = RawError;

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

/// How the reads split their counts over weighted queues: smooth weighted
/// round robin, carried from read to read. Over successive reads each queue
/// gets its weight's share of the tasks read, however small the reads, and
/// the order is deterministic; a queue of any weight gets a turn within
/// `total weight / its weight` tasks, so none starves.
#[derive(Debug, Default)]
pub struct Shares {
    current: Vec<i64>,
    /// Which open queue the next one-slot blocking read waits on.
    turn: usize,
}

impl Shares {
    /// `count` tasks split over `weighted` (queue index, weight): how many
    /// each gets, in the same order.
    pub fn split(&mut self, weighted: &[(usize, u32)], count: usize) -> Vec<usize> {
        let most = weighted.iter().map(|(at, _)| at + 1).max().unwrap_or(0);
        if self.current.len() < most {
            self.current.resize(most, 0);
        }
        let total: i64 = weighted.iter().map(|(_, weight)| i64::from(*weight)).sum();
        let mut counts = vec![0; weighted.len()];
        for _ in 0..count {
            let mut best = 0;
            for (slot, (at, weight)) in weighted.iter().enumerate() {
                self.current[*at] += i64::from(*weight);
                if self.current[*at] > self.current[weighted[best].0] {
                    best = slot;
                }
            }
            self.current[weighted[best].0] -= total;
            counts[best] += 1;
        }
        counts
    }
}

/// Reads up to `count` new entries across `queues`, at most one round trip
/// when work is there. With several queues, each gets a share of `count` by
/// weight (`Shares`; one pipelined non-blocking read); only when all are
/// empty does it block on all of them at once for up to `block_ms` (0 = do
/// not block).
/// Queues marked in `paused` are not read. `strict`: the queues are read
/// one after another in their order, each for what the ones before it did
/// not fill (a round trip per queue reached), so a queue's entries are
/// taken only while those before it have too few ready.
/// `one_slot` (Redis Cluster's rules: one command's keys on one slot): the
/// blocking read waits on one queue at a time, in turn, for a share of
/// `block_ms` (at least 50 ms), after the non-blocking read of them all;
/// on a cluster of several masters, one such read per master at once.
#[expect(clippy::too_many_arguments, reason = "one read, field by field")]
pub async fn read_new(
    reader: &mut Reader,
    queues: &[QueueSpec],
    paused: &[bool],
    strict: bool,
    shares: &mut Shares,
    group: &str,
    consumer: &str,
    count: usize,
    block_ms: u64,
    one_slot: bool,
) -> Result<Vec<(u16, RawEntry)>, ReadError> {
    let tag = |entries: Vec<(bytes::Bytes, RawEntry)>| -> Vec<(u16, RawEntry)> {
        entries
            .into_iter()
            .filter_map(|(key, entry)| {
                let index = queues
                    .iter()
                    .position(|queue| queue.stream.as_bytes() == key.as_ref())?;
                Some((index as u16, entry))
            })
            .collect()
    };
    let open_at: Vec<usize> = (0..queues.len())
        .filter(|index| paused.get(*index) != Some(&true))
        .collect();
    let open: Vec<&QueueSpec> = open_at.iter().map(|at| &queues[*at]).collect();
    if open.is_empty() {
        return Ok(Vec::new());
    }
    if strict && open.len() > 1 {
        let mut entries = Vec::new();
        for queue in &open {
            let left = count.saturating_sub(entries.len());
            if left == 0 {
                break;
            }
            let mut cmd = xreadgroup(group, consumer, left, None);
            cmd.arg(&queue.stream).arg(">");
            let replies = reader.query(std::slice::from_ref(&cmd)).await?;
            entries.extend(replies.into_iter().flat_map(reply::read_reply));
        }
        if !entries.is_empty() || block_ms == 0 {
            return Ok(tag(entries));
        }
    } else if open.len() > 1 {
        let weighted: Vec<(usize, u32)> =
            open_at.iter().map(|at| (*at, queues[*at].weight)).collect();
        let counts = shares.split(&weighted, count);
        let commands: Vec<Cmd> = open
            .iter()
            .zip(counts)
            .filter(|(_, share)| *share > 0)
            .map(|(queue, share)| {
                let mut cmd = xreadgroup(group, consumer, share, None);
                cmd.arg(&queue.stream).arg(">");
                cmd
            })
            .collect();
        let replies = reader.query(&commands).await?;
        let entries: Vec<_> = replies.into_iter().flat_map(reply::read_reply).collect();
        if !entries.is_empty() || block_ms == 0 {
            return Ok(tag(entries));
        }
    }
    if reader.is_cluster() && open.len() > 1 && block_ms > 0 {
        return block_per_master(reader, &open, shares, group, consumer, count, block_ms)
            .await
            .map(tag);
    }
    let (open, block_ms) = if one_slot && open.len() > 1 {
        shares.turn = (shares.turn + 1) % open.len();
        let share = (block_ms / open.len() as u64).max(50).min(block_ms);
        (vec![open[shares.turn]], share)
    } else {
        (open, block_ms)
    };
    let mut cmd = xreadgroup(group, consumer, count, (block_ms > 0).then_some(block_ms));
    for queue in &open {
        cmd.arg(&queue.stream);
    }
    for _ in &open {
        cmd.arg(">");
    }
    let mut replies = reader.query(std::slice::from_ref(&cmd)).await?;
    Ok(tag(replies
        .pop()
        .map(reply::read_reply)
        .unwrap_or_default()))
}

/// Redis Cluster, nothing ready: one blocking read per master, all at once
/// (each on one of that master's queues, in turn, for a share of
/// `block_ms`, at least 50 ms); the first to bring entries unblocks the
/// others.
async fn block_per_master(
    reader: &mut Reader,
    open: &[&QueueSpec],
    shares: &mut Shares,
    group: &str,
    consumer: &str,
    count: usize,
    block_ms: u64,
) -> Result<Vec<(bytes::Bytes, RawEntry)>, ReadError> {
    let mut masters: Vec<(crate::connection::slots::Address, Vec<&QueueSpec>)> = Vec::new();
    for queue in open {
        let Some(master) = reader.master_of(queue.stream.as_bytes()).await? else {
            continue;
        };
        match masters.iter_mut().find(|(address, _)| *address == master) {
            Some((_, queues)) => queues.push(queue),
            None => masters.push((master, vec![queue])),
        }
    }
    shares.turn = shares.turn.wrapping_add(1);
    // Several may bring entries before they are unblocked: together at
    // most `count`.
    let each = count.div_ceil(masters.len().max(1));
    let commands: Vec<Cmd> = masters
        .iter()
        .map(|(_, queues)| {
            let queue = queues[shares.turn % queues.len()];
            let share = (block_ms / queues.len() as u64).max(50).min(block_ms);
            let mut cmd = xreadgroup(group, consumer, each, Some(share));
            cmd.arg(&queue.stream).arg(">");
            cmd
        })
        .collect();
    let replies = reader.query_blocking(&commands).await?;
    Ok(replies.into_iter().flat_map(reply::read_reply).collect())
}

/// Reads a page of this consumer's own pending entries (left by an earlier
/// life of the same consumer name), after `after[i]` in each queue; advances
/// `after`. Entries deleted meanwhile come back with no fields.
pub async fn read_own_pending(
    reader: &mut Reader,
    queues: &[QueueSpec],
    group: &str,
    consumer: &str,
    count: usize,
    after: &mut [bytes::Bytes],
) -> Result<Vec<(u16, RawEntry)>, ReadError> {
    // One command per queue (COUNT is per stream either way), so each
    // command's keys stay on one slot; one round trip for all.
    let commands: Vec<Cmd> = queues
        .iter()
        .zip(after.iter())
        .map(|(queue, id)| {
            let mut cmd = xreadgroup(group, consumer, count, None);
            cmd.arg(&queue.stream).arg(id.as_ref());
            cmd
        })
        .collect();
    let replies = reader.query(&commands).await?;
    let mut out = Vec::new();
    for (key, entry) in replies.into_iter().flat_map(reply::read_reply) {
        if let Some(index) = queues
            .iter()
            .position(|queue| queue.stream.as_bytes() == key.as_ref())
        {
            after[index] = entry.entry_id.clone();
            out.push((index as u16, entry));
        }
    }
    Ok(out)
}

/// Splits `entries` into those to run and those whose task id already has a
/// done marker (idempotent tasks that completed within `processed_ttl`).
/// Costs a round trip only when some entry is idempotent.
pub async fn split_done(
    reader: &mut Reader,
    keys: &crate::keys::Keys,
    queues: &[QueueSpec],
    entries: Vec<(u16, RawEntry)>,
) -> Result<(Vec<(u16, RawEntry)>, Vec<(u16, RawEntry)>), ReadError> {
    use crate::envelope::field;
    let checks: Vec<(usize, Cmd)> = entries
        .iter()
        .enumerate()
        .filter(|(_, (_, entry))| entry.get(field::IDEMPOTENT) == Some(b"1"))
        .filter_map(|(position, (queue, entry))| {
            let id = String::from_utf8_lossy(entry.get(field::ID)?).into_owned();
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(keys.done(&queues[*queue as usize].name, &id));
            Some((position, cmd))
        })
        .collect();
    if checks.is_empty() {
        return Ok((entries, Vec::new()));
    }
    let commands: Vec<Cmd> = checks.iter().map(|(_, cmd)| cmd.clone()).collect();
    let replies = reader.query(&commands).await?;
    let mut done = vec![false; entries.len()];
    for ((position, _), reply) in checks.iter().zip(replies) {
        done[*position] = matches!(reply, BytesFrame::Integer(count) if count > 0);
    }
    let mut run = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for (entry, is_done) in entries.into_iter().zip(done) {
        if is_done {
            skipped.push(entry);
        } else {
            run.push(entry);
        }
    }
    Ok((run, skipped))
}

/// The `(entry id, delivery count)` rows of an extended `XPENDING` reply.
#[must_use]
pub fn pending_rows(reply: Option<BytesFrame>) -> Vec<(bytes::Bytes, u64)> {
    let Some(BytesFrame::Array(rows)) = reply else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|row| match row {
            BytesFrame::Array(fields) => Some((
                fields.first().and_then(reply::text)?.clone(),
                fields.get(3).and_then(reply::integer).unwrap_or(0).max(0) as u64,
            )),
            _ => None,
        })
        .collect()
}

/// The delivery count of each of `entries` (in `stream`), in one round trip:
/// how often Redis handed it out (a read, a claim, a re-read of our own).
pub async fn deliveries(
    reader: &mut Reader,
    stream: &str,
    group: &str,
    entries: &[RawEntry],
) -> Result<Vec<u64>, ReadError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let commands: Vec<Cmd> = entries
        .iter()
        .map(|entry| {
            let mut cmd = redis::cmd("XPENDING");
            cmd.arg(stream)
                .arg(group)
                .arg(entry.entry_id.as_ref())
                .arg(entry.entry_id.as_ref())
                .arg(1);
            cmd
        })
        .collect();
    let replies = reader.query(&commands).await?;
    Ok(replies
        .into_iter()
        .map(|reply| {
            let count = match reply {
                BytesFrame::Array(rows) => rows.first().and_then(|row| match row {
                    BytesFrame::Array(fields) => fields.get(3).and_then(|field| match field {
                        BytesFrame::Integer(value) => Some(*value),
                        _ => None,
                    }),
                    _ => None,
                }),
                _ => None,
            };
            count.unwrap_or(1).max(1) as u64
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::Shares;

    #[test]
    fn shares_follow_the_weights_over_small_reads_and_starve_none() {
        let mut shares = Shares::default();
        let weighted = [(0, 3), (2, 1)];
        let mut totals = [0, 0];
        for _ in 0..100 {
            let counts = shares.split(&weighted, 1); // one task per read
            totals[0] += counts[0];
            totals[1] += counts[1];
        }
        assert_eq!(totals, [75, 25]);
        // Deterministic, and the light queue gets a turn every 4 tasks.
        let mut again = Shares::default();
        let turns: Vec<usize> = (0..8)
            .map(|_| {
                again
                    .split(&weighted, 1)
                    .iter()
                    .position(|n| *n == 1)
                    .unwrap_or(9)
            })
            .collect();
        assert_eq!(turns, [0, 0, 1, 0, 0, 0, 1, 0]);
        assert_eq!(Shares::default().split(&[(1, 5), (3, 1)], 12), [10, 2]);
    }
}
