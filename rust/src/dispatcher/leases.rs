//! The concurrency leases this engine holds (see `limits`): which running
//! tasks hold one, renewed every `LEASE_RENEW_MS` while they run and freed
//! as soon as the dispatcher books their outcome. The Redis side runs in
//! its own task on the write connection, so the event loop never waits
//! for it; a lease it cannot renew (Redis away) lapses after
//! `LEASE_TTL_MS`, as a dead engine's does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connection::Link;
use bytes::Bytes;
use log::warn;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::limits::{self, Limiter, LEASE_RENEW_MS, LEASE_TTL_MS};
use crate::scripts;
use crate::streams::{QueueOutcomes, QueueSpec};

/// Longest wait for one Redis call of the keeper.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Weight of the newest run in the running average of run times.
const NEWEST: f64 = 0.2;

enum Change {
    /// Leases taken: `(limit, member)`.
    Take(Vec<(u16, Vec<u8>)>),
    /// Leases to free.
    Free(Vec<(u16, Vec<u8>)>),
}

/// The leases held, on the dispatcher's side.
pub struct Leases {
    limiter: Arc<Limiter>,
    queues: Arc<Vec<QueueSpec>>,
    /// Per queue index: entry id → (limit, when taken).
    held: Vec<HashMap<Bytes, (u16, Instant)>>,
    /// Leases taken since the last `flush`, for the keeper.
    taken: Vec<(u16, Vec<u8>)>,
    /// Running average run time per limit, ms.
    run_ms: Vec<Option<f64>>,
    changes: mpsc::UnboundedSender<Change>,
    keeper: JoinHandle<()>,
}

impl Leases {
    /// Starts the keeper on `connection`.
    #[must_use]
    pub fn start(limiter: Arc<Limiter>, queues: Arc<Vec<QueueSpec>>, connection: Link) -> Self {
        let (changes, incoming) = mpsc::unbounded_channel();
        let keys: Vec<String> = limiter
            .limits
            .iter()
            .map(|limit| limit.lease_key.clone())
            .collect();
        let keeper = tokio::spawn(keep(keys, connection, incoming));
        Self {
            run_ms: vec![None; limiter.limits.len()],
            limiter,
            held: vec![HashMap::new(); queues.len()],
            queues,
            taken: Vec::new(),
            changes,
            keeper,
        }
    }

    /// Records leases a batch took (`(queue, entry id)` → limit); the
    /// keeper hears of them, all in one message, at the next `flush`.
    pub fn take(&mut self, leased: impl IntoIterator<Item = ((u16, Bytes), u16)>) {
        let now = Instant::now();
        for ((queue, entry_id), at) in leased {
            self.taken.push((
                at,
                limits::member(&self.queues[usize::from(queue)].name, &entry_id),
            ));
            self.held[usize::from(queue)].insert(entry_id, (at, now));
        }
    }

    /// Tells the keeper of the leases taken since the last call, then frees
    /// those of the tasks whose outcomes are in `outcomes` (a queue holding
    /// no lease costs nothing per task).
    pub fn flush(&mut self, outcomes: Option<&[QueueOutcomes]>) {
        if !self.taken.is_empty() {
            let _ = self
                .changes
                .send(Change::Take(std::mem::take(&mut self.taken)));
        }
        let Some(outcomes) = outcomes else {
            return;
        };
        let now = Instant::now();
        let mut freed = Vec::new();
        for (queue, outcome) in outcomes.iter().enumerate() {
            let held = &mut self.held[queue];
            if held.is_empty() {
                continue;
            }
            for entry_id in &outcome.finished {
                let Some((at, since)) = held.remove(entry_id) else {
                    continue;
                };
                let ran = now.duration_since(since).as_secs_f64() * 1000.0;
                let average = self.run_ms[usize::from(at)]
                    .map_or(ran, |average| average + NEWEST * (ran - average));
                self.run_ms[usize::from(at)] = Some(average);
                self.limiter.observe_run(at, average);
                freed.push((at, limits::member(&self.queues[queue].name, entry_id)));
            }
        }
        if !freed.is_empty() {
            let _ = self.changes.send(Change::Free(freed));
        }
    }

    /// Frees the leases of tasks whose outcomes will never be written by
    /// this engine (read from a master before a failover: they run again).
    pub fn forget(&mut self, tasks: &[(u16, Bytes)]) {
        let freed: Vec<_> = tasks
            .iter()
            .filter_map(|(queue, entry_id)| {
                let (at, _) = self.held.get_mut(usize::from(*queue))?.remove(entry_id)?;
                Some((
                    at,
                    limits::member(&self.queues[usize::from(*queue)].name, entry_id),
                ))
            })
            .collect();
        if !freed.is_empty() {
            let _ = self.changes.send(Change::Free(freed));
        }
    }

    /// Frees every lease still held (the engine stops), within `grace`.
    pub async fn stop(self, grace: Duration) {
        let Self {
            changes,
            mut keeper,
            taken,
            ..
        } = self;
        if !taken.is_empty() {
            let _ = changes.send(Change::Take(taken));
        }
        drop(changes);
        if tokio::time::timeout(grace, &mut keeper).await.is_err() {
            keeper.abort();
            warn!("could not free this engine's concurrency leases; they lapse within {LEASE_TTL_MS} ms");
        }
    }
}

/// The keeper: applies changes, renews what is held, frees it all when the
/// dispatcher lets go of the channel.
async fn keep(
    keys: Vec<String>,
    mut connection: Link,
    mut changes: mpsc::UnboundedReceiver<Change>,
) {
    let renew = redis::Script::new(scripts::LEASES_RENEW);
    let mut held: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); keys.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(LEASE_RENEW_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Some(Change::Take(taken)) => {
                    for (at, member) in taken {
                        held[usize::from(at)].insert(member);
                    }
                }
                Some(Change::Free(freed)) => {
                    let mut pipe = redis::pipe();
                    for (at, member) in freed {
                        if held[usize::from(at)].remove(&member) {
                            pipe.cmd("ZREM").arg(&keys[usize::from(at)]).arg(member).ignore();
                        }
                    }
                    call(&mut connection, &pipe, &mut failing).await;
                }
                None => break,
            },
            _ = tick.tick() => {
                if held.iter().all(HashSet::is_empty) {
                    continue;
                }
                let mut invocation = renew.prepare_invoke();
                let mut args: Vec<Vec<u8>> = vec![LEASE_TTL_MS.to_string().into_bytes()];
                for (key, members) in keys.iter().zip(&held).filter(|(_, members)| !members.is_empty()) {
                    invocation.key(key);
                    args.push(members.len().to_string().into_bytes());
                    args.extend(members.iter().cloned());
                }
                for arg in args {
                    invocation.arg(arg);
                }
                let renewed = tokio::time::timeout(
                    CALL_TIMEOUT,
                    invocation.invoke_async::<i64>(&mut connection),
                )
                .await;
                let renewed = match renewed {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                report(renewed, &mut failing);
            }
        }
    }
    let mut pipe = redis::pipe();
    for (key, members) in keys.iter().zip(held) {
        if !members.is_empty() {
            pipe.cmd("ZREM")
                .arg(key)
                .arg(members.into_iter().collect::<Vec<_>>())
                .ignore();
        }
    }
    call(&mut connection, &pipe, &mut failing).await;
}

/// Sends `pipe` (when it holds anything) within `CALL_TIMEOUT`.
async fn call(connection: &mut Link, pipe: &redis::Pipeline, failing: &mut bool) {
    if pipe.cmd_iter().next().is_none() {
        return;
    }
    let sent = match tokio::time::timeout(CALL_TIMEOUT, pipe.query_async::<()>(connection)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    };
    report(sent, failing);
}

/// Logs the first failure of a run of them, and the recovery.
fn report(result: Result<(), String>, failing: &mut bool) {
    match result {
        Ok(()) => {
            if *failing {
                log::info!("concurrency leases: redis is back");
                *failing = false;
            }
        }
        Err(error) => {
            if !*failing {
                warn!(
                    "concurrency leases cannot be renewed or freed ({error}); \
                     they lapse within {LEASE_TTL_MS} ms"
                );
                *failing = true;
            }
        }
    }
}
