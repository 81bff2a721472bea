//! Global rate and concurrency limits per task type, held across every
//! engine on the same Redis (`Engine(rate_limits=..., concurrency_limits=...)`).
//!
//! A read's batch is checked once, by the read loop (or the recovery loop
//! for claimed tasks), before the dispatcher sees it: one `LIMITS_ADMIT`
//! script call for every limited type the batch holds, and none when it
//! holds no limited type (the cost is then one look at each entry's type).
//! Per type, the first tasks in batch order that the limits allow run; the
//! others are held back: they go to their queue's delayed set with their
//! attempt unchanged (counted as `throttled`, never as failed) and come
//! back when there should be room:
//!
//! - over a rate limit, at the GCRA time when the next one is allowed, one
//!   emission interval apart (`T = period / limit`);
//! - over a concurrency limit, spread at about the pace places free up: the
//!   engine's running average of the type's run time divided by the limit
//!   (1 s before any run ended), with ±20% jitter so engines do not step
//!   in lockstep.
//!
//! The burst of a rate limit is `max(1, limit / 10)` tasks: any window of a
//! period's length starts at most `limit + burst` of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::envelope::{field, RawEntry};
use crate::keys::Keys;
use crate::scripts;
use crate::streams::reader::{ReadError, Reader};
use crate::streams::{reply, QueueSpec};

/// How long a concurrency lease lives without renewal, ms: a dead engine's
/// places free within this time.
pub const LEASE_TTL_MS: u64 = 5_000;
/// How often a live engine renews its leases, ms.
pub const LEASE_RENEW_MS: u64 = 1_000;
/// The run time assumed for a type before one of its runs ended here, ms.
const FIRST_RUN_MS: u64 = 1_000;
/// Bounds of the pace at which held-back tasks come back, ms apart.
const SPACING_MS: (u64, u64) = (5, 2_000);

/// The limits of one task type.
#[derive(Debug)]
pub struct Limit {
    /// The task type.
    pub kind: Bytes,
    /// GCRA emission interval, ms (0 = no rate limit).
    pub interval_ms: f64,
    /// GCRA tolerance (`interval · burst`), ms.
    pub tau_ms: f64,
    /// Most tasks running at once (0 = no concurrency limit).
    pub concurrency: u32,
    rate_key: String,
    /// Its lease set.
    pub lease_key: String,
    /// How far apart tasks held back by the concurrency limit come back, ms.
    spacing_ms: AtomicU64,
}

/// Every limit an engine enforces.
#[derive(Debug)]
pub struct Limiter {
    /// One entry per limited type.
    pub limits: Vec<Limit>,
    script: redis::Script,
}

/// What the limits said of a batch: the tasks held back (with when they
/// may come back, ms since the epoch) and those that took a concurrency
/// lease (with the limit's index), by `(queue, entry id)`. Empty (and free)
/// when the batch held no limited type.
#[derive(Debug, Default)]
pub struct Admission {
    /// Held back: due time.
    pub held: HashMap<(u16, Bytes), u64>,
    /// Leased: index into `Limiter::limits`.
    pub leased: HashMap<(u16, Bytes), u16>,
}

impl Admission {
    /// Whether the limits held nothing back and leased nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.leased.is_empty()
    }
}

/// The index of `kind`'s limit in `limits`, made (limiting nothing yet) on
/// first use.
fn entry(limits: &mut Vec<Limit>, keys: &Keys, kind: &str) -> usize {
    if let Some(at) = limits
        .iter()
        .position(|limit| limit.kind == kind.as_bytes())
    {
        return at;
    }
    limits.push(Limit {
        kind: Bytes::copy_from_slice(kind.as_bytes()),
        interval_ms: 0.0,
        tau_ms: 0.0,
        concurrency: 0,
        rate_key: keys.rate(kind),
        lease_key: keys.running(kind),
        spacing_ms: AtomicU64::new(0),
    });
    limits.len() - 1
}

/// The burst a rate limit of `count` per period allows.
#[must_use]
pub fn burst(count: u64) -> u64 {
    (count / 10).max(1)
}

impl Limiter {
    /// The limiter for `rates` (`(type, count, period ms)`) and `concurrency`
    /// (`(type, most running)`); `None` when there is no limit.
    #[must_use]
    pub fn new(
        keys: &Keys,
        rates: &[(String, u64, u64)],
        concurrency: &[(String, u32)],
    ) -> Option<Self> {
        let mut limits: Vec<Limit> = Vec::new();
        for (kind, count, period_ms) in rates.iter().filter(|(_, count, _)| *count > 0) {
            let at = entry(&mut limits, keys, kind);
            let interval = *period_ms as f64 / *count as f64;
            limits[at].interval_ms = interval;
            limits[at].tau_ms = interval * burst(*count) as f64;
        }
        for (kind, most) in concurrency.iter().filter(|(_, most)| *most > 0) {
            let at = entry(&mut limits, keys, kind);
            limits[at].concurrency = *most;
        }
        for limit in &limits {
            limit.spacing_ms.store(
                spacing(FIRST_RUN_MS as f64, limit.concurrency),
                Ordering::Relaxed,
            );
        }
        (!limits.is_empty()).then(|| Self {
            limits,
            script: redis::Script::new(scripts::LIMITS_ADMIT),
        })
    }

    /// The index of the limit on `entry`'s task type.
    fn limit_of(&self, entry: &RawEntry) -> Option<u16> {
        let kind = entry.get(field::TYPE)?;
        self.limits
            .iter()
            .position(|limit| limit.kind == kind)
            .map(|at| at as u16)
    }

    /// Records that runs of limit `at`'s type take `run_ms` on average here:
    /// held-back tasks come back at the pace its places free up.
    pub fn observe_run(&self, at: u16, run_ms: f64) {
        if let Some(limit) = self.limits.get(usize::from(at)) {
            limit
                .spacing_ms
                .store(spacing(run_ms, limit.concurrency), Ordering::Relaxed);
        }
    }

    /// Checks a batch (`(queue, entry)` per task, in batch order): one
    /// script call when some task has a limited type, none otherwise.
    pub async fn admit<'a>(
        &self,
        reader: &mut Reader,
        queues: &[QueueSpec],
        batch: impl Iterator<Item = (u16, &'a RawEntry)>,
    ) -> Result<Admission, ReadError> {
        let mut asking: Vec<Vec<(u16, &RawEntry)>> = Vec::new();
        for (queue, entry) in batch {
            if let Some(at) = self.limit_of(entry) {
                if asking.is_empty() {
                    asking.resize_with(self.limits.len(), Vec::new);
                }
                asking[usize::from(at)].push((queue, entry));
            }
        }
        if asking.is_empty() {
            return Ok(Admission::default());
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash());
        let asked: Vec<usize> = (0..asking.len())
            .filter(|at| !asking[*at].is_empty())
            .collect();
        cmd.arg(asked.len() * 2);
        for at in &asked {
            cmd.arg(&self.limits[*at].rate_key)
                .arg(&self.limits[*at].lease_key);
        }
        cmd.arg(LEASE_TTL_MS);
        for at in &asked {
            let limit = &self.limits[*at];
            let tasks = &asking[*at];
            cmd.arg(tasks.len())
                .arg(limit.interval_ms)
                .arg(limit.tau_ms)
                .arg(limit.concurrency);
            if limit.concurrency > 0 {
                for (queue, entry) in tasks {
                    cmd.arg(member(&queues[usize::from(*queue)].name, &entry.entry_id));
                }
            }
        }
        let reply = match reader.query(std::slice::from_ref(&cmd)).await {
            Err(ReadError::Server(message)) if message.starts_with("NOSCRIPT") => {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(scripts::LIMITS_ADMIT);
                reader.query(&[load, cmd]).await?.pop()
            }
            other => other?.pop(),
        };
        let Some(BytesFrame::Array(parts)) = reply else {
            return Err(ReadError::Protocol(
                "limits script: not an array".to_owned(),
            ));
        };
        let number = |frame: Option<&BytesFrame>| -> Option<f64> {
            let frame = frame?;
            reply::integer(frame)
                .map(|value| value as f64)
                .or_else(|| std::str::from_utf8(reply::text(frame)?).ok()?.parse().ok())
        };
        let now = number(parts.first())
            .ok_or_else(|| ReadError::Protocol("limits script: no time".to_owned()))?;
        let mut admission = Admission::default();
        for (step, at) in asked.iter().enumerate() {
            let limit = &self.limits[*at];
            let tasks = &asking[*at];
            let base = 1 + step * 3;
            let admitted = number(parts.get(base)).unwrap_or(0.0).max(0.0) as usize;
            let arrival = number(parts.get(base + 1));
            let free = number(parts.get(base + 2)).unwrap_or(-1.0);
            let dues = held_dues(
                limit,
                now,
                tasks.len(),
                admitted,
                arrival,
                free,
                limit.spacing_ms.load(Ordering::Relaxed),
            );
            for (position, (queue, entry)) in tasks.iter().enumerate() {
                let key = (*queue, entry.entry_id.clone());
                if position < admitted {
                    if limit.concurrency > 0 {
                        admission.leased.insert(key, *at as u16);
                    }
                } else {
                    admission.held.insert(key, dues[position - admitted]);
                }
            }
        }
        Ok(admission)
    }
}

/// How far apart tasks held back by a concurrency limit of `limit` come
/// back when a run takes `run_ms`.
fn spacing(run_ms: f64, limit: u32) -> u64 {
    if limit == 0 {
        return 0;
    }
    ((run_ms / f64::from(limit)) as u64).clamp(SPACING_MS.0, SPACING_MS.1)
}

/// When each of the `asked − admitted` tasks held back may come back (ms
/// since the epoch), from the script's answer: the rate limit's next free
/// times, the concurrency limit's pace, whichever is later.
fn held_dues(
    limit: &Limit,
    now: f64,
    asked: usize,
    admitted: usize,
    arrival: Option<f64>,
    free: f64,
    spacing_ms: u64,
) -> Vec<u64> {
    let by_rate = limit.interval_ms > 0.0 && admitted < asked;
    let by_leases = limit.concurrency > 0 && free < asked as f64;
    (0..asked.saturating_sub(admitted))
        .map(|j| {
            let mut due = now;
            if let (true, Some(arrival)) = (by_rate, arrival) {
                due = due.max(arrival - limit.tau_ms + (j + 1) as f64 * limit.interval_ms);
            }
            if by_leases {
                let jitter = 0.8 + 0.4 * fastrand::f64();
                due = due.max(now + (j + 1) as f64 * spacing_ms as f64 * jitter);
            }
            due.ceil() as u64
        })
        .collect()
}

/// A task's member in its type's lease set: `<entry id>|<queue>`.
#[must_use]
pub fn member(queue: &str, entry_id: &[u8]) -> Vec<u8> {
    let mut member = Vec::with_capacity(entry_id.len() + 1 + queue.len());
    member.extend_from_slice(entry_id);
    member.push(b'|');
    member.extend_from_slice(queue.as_bytes());
    member
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Limiter {
        Limiter::new(
            &Keys::default(),
            &[
                ("mail".to_owned(), 20, 1000),
                ("both".to_owned(), 100, 60_000),
            ],
            &[("both".to_owned(), 2), ("report".to_owned(), 4)],
        )
        .expect("limits")
    }

    #[test]
    fn limits_are_merged_per_type() {
        let limiter = limiter();
        let kinds: Vec<&[u8]> = limiter
            .limits
            .iter()
            .map(|limit| limit.kind.as_ref())
            .collect();
        assert_eq!(kinds, [&b"mail"[..], b"both", b"report"]);
        let mail = &limiter.limits[0];
        assert!((mail.interval_ms - 50.0).abs() < 1e-9);
        assert!((mail.tau_ms - 100.0).abs() < 1e-9, "burst 2 for 20/s");
        assert_eq!(limiter.limits[1].concurrency, 2);
        assert!((limiter.limits[1].interval_ms - 600.0).abs() < 1e-9);
        assert_eq!(burst(5), 1);
        assert!(Limiter::new(&Keys::default(), &[], &[]).is_none());
    }

    #[test]
    fn held_tasks_come_back_one_interval_apart_past_the_arrival_time() {
        let limiter = limiter();
        let mail = &limiter.limits[0];
        // 5 asked, 2 admitted; TAT after is now + 100 (τ = 100): the next
        // is allowed at TAT − τ + T.
        let dues = held_dues(mail, 1000.0, 5, 2, Some(1100.0), -1.0, 0);
        assert_eq!(dues, [1050, 1100, 1150]);
        // Leases: spaced by the pace, with jitter, never before now.
        let report = &limiter.limits[2];
        let dues = held_dues(report, 1000.0, 6, 4, None, 4.0, 250);
        assert_eq!(dues.len(), 2);
        assert!((1200..=1300).contains(&dues[0]), "{dues:?}");
        assert!((1400..=1600).contains(&dues[1]), "{dues:?}");
        assert_eq!(spacing(1000.0, 4), 250);
        assert_eq!(spacing(1.0, 4), 5);
        assert_eq!(spacing(1e9, 1), 2000);
    }
}
