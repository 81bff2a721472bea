//! Handler run times, measured inside an actor with no per-task Python work.
//!
//! The actor already tells the core when each task starts (`begin`) and when
//! a range ends (`finish`); a task's run lasts from its `begin` to the next
//! `begin` or `finish`. Runs are added to a histogram per (queue, type) in
//! the actor's memory, and sent to the dispatcher as one small frame about
//! once a second, or when the actor is about to go idle.

use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the run-time buckets; a last one (+Inf) follows.
/// Changing them garbles the histograms already in Redis.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How often run times are sent while the actor stays busy.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Most task types timed apart by one actor; runs of further types share
/// the histogram of type `(other)`.
const MAX_KINDS: usize = 1000;
const OTHER_KINDS: &str = "(other)";

/// The bucket of a run of `seconds`: the first bound it does not exceed.
#[must_use]
pub fn bucket_of(seconds: f64) -> usize {
    DURATION_BUCKETS.partition_point(|bound| *bound < seconds)
}

/// One report item: queue index, type, seconds in all, `(bucket, runs)`.
pub type ReportItem<'a> = (u16, &'a str, f64, Vec<(usize, u64)>);

#[derive(Debug, Clone)]
struct Histogram {
    queue: u16,
    kind: u16,
    sum: f64,
    counts: [u64; DURATION_BUCKETS.len() + 1],
}

/// Batches whose task types are kept for async tasks still running.
const KEPT_BATCHES: usize = 256;

/// One actor's run-time histograms and the batches being run.
#[derive(Debug)]
pub struct RunTimes {
    kinds: Vec<String>,
    /// Per recent batch (newest last): its id and the (queue, kind) of each
    /// of its tasks. Async tasks of older batches may still be running.
    batches: std::collections::VecDeque<(u64, Vec<(u16, u16)>)>,
    running: Option<(usize, Instant)>,
    histograms: Vec<Histogram>,
    last_report: Instant,
    /// Handler time since `take_work_us` was last called, ns.
    work_ns: u64,
}

impl Default for RunTimes {
    fn default() -> Self {
        Self {
            kinds: Vec::new(),
            batches: std::collections::VecDeque::new(),
            running: None,
            histograms: Vec::new(),
            last_report: Instant::now(),
            work_ns: 0,
        }
    }
}

impl RunTimes {
    /// A new batch arrived: `tasks` gives each task's queue index and type.
    /// Sync tasks (`begin`, `end`) belong to the newest batch; async ones
    /// name theirs (`observe_in`), which is kept until `forget` (or until
    /// `KEPT_BATCHES` newer ones arrived).
    pub fn start_batch<'a>(&mut self, batch_id: u64, tasks: impl Iterator<Item = (u16, &'a str)>) {
        self.running = None;
        let mut mapping = Vec::new();
        let mut last: Option<(&str, u16)> = None;
        for (queue, kind) in tasks {
            let id = match last {
                Some((name, id)) if name == kind => id,
                _ => self.intern(kind),
            };
            last = Some((kind, id));
            mapping.push((queue, id));
        }
        if self.batches.len() >= KEPT_BATCHES {
            self.batches.pop_front();
        }
        self.batches.push_back((batch_id, mapping));
    }

    /// Batch `batch_id` has no task running any more.
    pub fn forget(&mut self, batch_id: u64) {
        self.batches.retain(|(id, _)| *id != batch_id);
    }

    fn intern(&mut self, kind: &str) -> u16 {
        if let Some(at) = self.kinds.iter().position(|known| known == kind) {
            return at as u16;
        }
        if self.kinds.len() >= MAX_KINDS {
            // A flood of distinct types: the rest share one histogram.
            return self.intern_other();
        }
        self.kinds.push(kind.to_owned());
        (self.kinds.len() - 1) as u16
    }

    fn intern_other(&mut self) -> u16 {
        if let Some(at) = self.kinds.iter().position(|known| known == OTHER_KINDS) {
            return at as u16;
        }
        self.kinds.push(OTHER_KINDS.to_owned());
        (self.kinds.len() - 1) as u16
    }

    /// Task `index` of the batch starts now (ending the one before, if any).
    pub fn begin(&mut self, index: usize, now: Instant) {
        self.end(now);
        self.running = Some((index, now));
    }

    /// The running task, if any, ended now.
    pub fn end(&mut self, now: Instant) {
        if let Some((index, started)) = self.running.take() {
            self.observe(index, now.duration_since(started).as_secs_f64());
        }
    }

    /// Handler time observed since the last call, µs (what the tasks a
    /// result frame ends cost: the dispatcher's prefetch learns from it).
    /// Rounded up: any run observed makes it at least 1.
    pub fn take_work_us(&mut self) -> u64 {
        std::mem::take(&mut self.work_ns).div_ceil(1000)
    }

    /// Adds a run of task `index` of the newest batch that took `seconds`.
    pub fn observe(&mut self, index: usize, seconds: f64) {
        let batch_id = self.batches.back().map_or(0, |(id, _)| *id);
        self.observe_in(batch_id, index, seconds);
    }

    /// Adds a run of task `index` of batch `batch_id` that took `seconds`.
    pub fn observe_in(&mut self, batch_id: u64, index: usize, seconds: f64) {
        self.work_ns += (seconds * 1e9) as u64;
        let Some(&(queue, kind)) = self
            .batches
            .iter()
            .rev()
            .find(|(id, _)| *id == batch_id)
            .and_then(|(_, mapping)| mapping.get(index))
        else {
            return;
        };
        let at = if let Some(at) = self
            .histograms
            .iter()
            .position(|known| known.queue == queue && known.kind == kind)
        {
            at
        } else {
            self.histograms.push(Histogram {
                queue,
                kind,
                sum: 0.0,
                counts: [0; DURATION_BUCKETS.len() + 1],
            });
            self.histograms.len() - 1
        };
        let histogram = &mut self.histograms[at];
        histogram.sum += seconds;
        histogram.counts[bucket_of(seconds)] += 1;
    }

    /// The report to send now, if one is due (`idle`: the actor is about to
    /// wait for work), as the JSON of a `RUN_TIMES` frame. Resets.
    pub fn take_report(&mut self, idle: bool, now: Instant) -> Option<Vec<u8>> {
        let due = idle || now.duration_since(self.last_report) >= REPORT_EVERY;
        if !due
            || self
                .histograms
                .iter()
                .all(|known| known.counts.iter().all(|c| *c == 0))
        {
            return None;
        }
        self.last_report = now;
        let report: Vec<ReportItem<'_>> = self
            .histograms
            .iter()
            .filter(|known| known.counts.iter().any(|count| *count > 0))
            .map(|known| {
                (
                    known.queue,
                    self.kinds[known.kind as usize].as_str(),
                    known.sum,
                    known
                        .counts
                        .iter()
                        .enumerate()
                        .filter(|(_, count)| **count > 0)
                        .map(|(bucket, count)| (bucket, *count))
                        .collect(),
                )
            })
            .collect();
        let json = serde_json::to_vec(&report).ok();
        for known in &mut self.histograms {
            known.sum = 0.0;
            known.counts = [0; DURATION_BUCKETS.len() + 1];
        }
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds_inclusive() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(0.0005), 0);
        assert_eq!(bucket_of(0.0006), 1);
        assert_eq!(bucket_of(60.0), 15);
        assert_eq!(bucket_of(61.0), 16);
    }

    #[test]
    fn runs_last_from_begin_to_the_next_begin_or_end() {
        let mut times = RunTimes::default();
        times.start_batch(7, [(0, "a"), (0, "a"), (1, "b")].into_iter());
        let start = Instant::now();
        times.begin(0, start);
        times.begin(1, start + Duration::from_millis(2));
        times.end(start + Duration::from_millis(3));
        times.observe(2, 20.0);
        assert!(times.take_report(false, start).is_none(), "not due yet");
        let report = times.take_report(true, start).expect("idle sends");
        let parsed: Vec<ReportItem<'_>> =
            serde_json::from_slice(&report).expect("the report is JSON");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, 0);
        assert_eq!(parsed[0].1, "a");
        assert!((parsed[0].2 - 0.003).abs() < 1e-9);
        assert_eq!(parsed[0].3, vec![(1, 1), (2, 1)]);
        assert_eq!(parsed[1].1, "b");
        assert_eq!(parsed[1].3, vec![(14, 1)]);
        assert!(
            times.take_report(true, start).is_none(),
            "reset after sending"
        );
    }
}
