//! `Region` (created by the supervisor before it forks) and `ActorEnd` (an
//! actor process's side of its two rings).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFrozenSet, PyList, PyString, PyTuple};

use super::errors::error;
use crate::dispatcher::{defaults, Report};
use crate::frame::{self, Range, Record};
use crate::outcome::{clip, Outcome, MAX_RESULT_BYTES};
use crate::region::{self, Region, RegionLayout, SLOT_RUNNING};
use crate::ring::Wait;
use crate::timing::{RunTimes, DURATION_BUCKETS};

/// The shared memory of one engine. Create it before forking any process.
#[pyclass(module = "flumeq._core", name = "Region", frozen)]
pub struct PyRegion {
    inner: Arc<Region>,
}

#[pymethods]
impl PyRegion {
    #[new]
    #[pyo3(signature = (processes, task_ring_bytes = defaults::TASK_RING_BYTES, result_ring_bytes = defaults::RESULT_RING_BYTES))]
    fn new(
        py: Python<'_>,
        processes: usize,
        task_ring_bytes: usize,
        result_ring_bytes: usize,
    ) -> PyResult<Self> {
        let layout = RegionLayout {
            slots: processes,
            task_ring_bytes,
            result_ring_bytes,
        };
        let inner =
            Region::new(layout).map_err(|failure| error(py, "ConfigError", failure.to_string()))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Number of actor slots.
    #[getter]
    fn processes(&self) -> usize {
        self.inner.layout().slots
    }

    /// Asks the dispatcher to stop taking tasks and finish.
    fn request_stop(&self) {
        self.inner.request_stop();
    }

    /// Whether a stop was requested.
    fn stop_requested(&self) -> bool {
        self.inner.stop_requested()
    }

    /// Supervisor: the actor in `slot` exited with `status` (multiprocessing's
    /// exitcode: negative = killed by that signal).
    fn mark_lost(&self, slot: usize, status: i32) -> PyResult<()> {
        self.check(slot)?;
        self.inner.mark_lost(slot, status);
        Ok(())
    }

    /// Supervisor: a new actor is about to start in `slot`.
    fn mark_starting(&self, slot: usize) -> PyResult<()> {
        self.check(slot)?;
        self.inner.mark_starting(slot);
        Ok(())
    }

    /// State of `slot`: 0 starting, 1 running, 2 lost, 3 reclaimed.
    fn slot_state(&self, slot: usize) -> PyResult<u32> {
        self.check(slot)?;
        Ok(self.inner.slot(slot).state.load(Ordering::SeqCst))
    }

    /// Whether the dispatcher released the actors (their exits are expected).
    fn closing(&self) -> bool {
        self.inner.closing()
    }

    /// Tells every actor there is no more work.
    fn close_all(&self) {
        self.inner.close_all();
    }

    /// The engine's counts (processed, failed, ...) over every dispatcher
    /// life so far.
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, count) in Report::NAMES.iter().zip(self.inner.counts()) {
            dict.set_item(*name, count)?;
        }
        Ok(dict)
    }

    /// Supervisor, after its dispatcher died and its actors were killed:
    /// empties every slot for a new dispatcher and new actors.
    fn reset_slots(&self) {
        self.inner.reset_slots();
    }

    /// The actor side of `slot`, for the process that runs it.
    fn actor(&self, slot: usize, queues: Vec<String>) -> PyResult<ActorEnd> {
        self.check(slot)?;
        Ok(ActorEnd {
            region: Arc::clone(&self.inner),
            slot,
            queues,
            buffer: Mutex::new(Vec::new()),
            times: Mutex::new(RunTimes::default()),
            clock: (Instant::now(), region::monotonic_ms()),
            parallel: AtomicU32::new(1),
        })
    }
}

impl PyRegion {
    fn check(&self, slot: usize) -> PyResult<()> {
        if slot < self.inner.layout().slots {
            Ok(())
        } else {
            Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "slot {slot} out of range 0..{}",
                self.inner.layout().slots
            )))
        }
    }

    /// The region, for the dispatcher binding.
    pub fn region(&self) -> &Region {
        &self.inner
    }
}

/// An actor process's end of its rings.
#[pyclass(module = "flumeq._core", name = "ActorEnd", frozen)]
pub struct ActorEnd {
    region: Arc<Region>,
    slot: usize,
    queues: Vec<String>,
    buffer: Mutex<Vec<u8>>,
    times: Mutex<RunTimes>,
    /// An `Instant` and the `monotonic_ms` of the same moment: one clock read
    /// per task then serves both the run time and the slot header.
    clock: (Instant, u64),
    /// How many async tasks this actor runs at once (1 without async handlers).
    parallel: AtomicU32,
}

/// `(index, outcome, delay_ms, message, traceback, value)`: `value` is a
/// success's return value as JSON (empty when the task keeps no result).
type PyRecord = (u32, u8, u64, String, String, Vec<u8>);

fn records(failures: &[PyRecord]) -> PyResult<Vec<Record<'_>>> {
    failures
        .iter()
        .map(|(index, outcome, delay_ms, message, traceback, value)| {
            let outcome = Outcome::from_byte(*outcome).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err(format!("unknown outcome {outcome}"))
            })?;
            if value.len() > MAX_RESULT_BYTES {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "a result of {} bytes is over MAX_RESULT_BYTES ({MAX_RESULT_BYTES})",
                    value.len()
                )));
            }
            Ok(Record {
                index: *index,
                outcome,
                delay_ms: *delay_ms,
                message: clip(message, false).as_bytes(),
                traceback: clip(traceback, true).as_bytes(),
                value,
            })
        })
        .collect()
}

#[pymethods]
impl ActorEnd {
    /// Marks the slot running with this process's pid; `parallel` is how
    /// many async tasks it runs at once (1 without async handlers).
    #[pyo3(signature = (parallel = 1))]
    fn started(&self, parallel: u32) {
        let header = self.region.slot(self.slot);
        self.parallel.store(parallel.max(1), Ordering::Relaxed);
        header.parallel.store(parallel.max(1), Ordering::SeqCst);
        header.pid.store(std::process::id(), Ordering::SeqCst);
        header.running_index.store(0, Ordering::SeqCst);
        header.state.store(SLOT_RUNNING, Ordering::SeqCst);
    }

    /// Waits for the next batch (without holding the GIL). Returns
    /// `(batch_id, tasks)` or `None` once the dispatcher closed the ring. Each
    /// task is `(id, type, queue, payload, attempt, max_retry, enqueued_at,
    /// timeout, labels, result)` with times in seconds; `result`: 1 = send
    /// the return value back (as JSON, in its record) as the kept result, 2
    /// = send it back when it can, for the history, 0 = do not.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Option<(u64, Bound<'py, PyList>)>> {
        let ring = self.region.task_ring(self.slot);
        loop {
            let decoded = ring.read_frame(|bytes| self.decode(py, bytes));
            if let Some(decoded) = decoded {
                return decoded.map(Some);
            }
            match py.detach(|| ring.wait_for_frame(Some(Duration::from_secs(1)))) {
                Wait::Closed if !ring.has_frame() => return Ok(None),
                _ => py.check_signals()?,
            }
        }
    }

    /// Waits up to `timeout` seconds (GIL released) for a batch without
    /// taking it: `True` when one is there (take it with `try_recv`, from
    /// the thread that runs the tasks), `False` on timeout, `None` once the
    /// dispatcher closed the ring and nothing is left. For an event loop
    /// that waits on another thread while its tasks run.
    fn wait(&self, py: Python<'_>, timeout: f64) -> Option<bool> {
        let ring = self.region.task_ring(self.slot);
        if ring.has_frame() {
            return Some(true);
        }
        let wait = Duration::from_secs_f64(timeout.max(0.0));
        match py.detach(|| ring.wait_for_frame(Some(wait))) {
            _ if ring.has_frame() => Some(true),
            Wait::Closed => None,
            _ => Some(false),
        }
    }

    /// The next batch if one is there, else `None` (never waits).
    fn try_recv<'py>(&self, py: Python<'py>) -> PyResult<Option<(u64, Bound<'py, PyList>)>> {
        let ring = self.region.task_ring(self.slot);
        ring.read_frame(|bytes| self.decode(py, bytes)).transpose()
    }

    /// Whether the engine is stopping (no task may start).
    fn stopping(&self) -> bool {
        self.region.stop_requested()
    }

    /// The names of the paused queues (their tasks must not start: report
    /// them `NOT_STARTED`), or `None` when no queue is paused (one load).
    fn paused<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyFrozenSet>>> {
        if !self.region.any_paused() {
            return Ok(None);
        }
        let names = self
            .queues
            .iter()
            .enumerate()
            .filter(|(index, _)| self.region.is_paused(*index))
            .map(|(_, name)| name.as_str());
        PyFrozenSet::new(py, names).map(Some)
    }

    /// The tasks `(batch_id, index)` the dispatcher cancelled since the
    /// last call (it signals SIGUSR1 after posting them): skip them, or stop
    /// the one running. One load when there are none.
    fn take_cancels(&self) -> Vec<(u64, u32)> {
        self.region.take_cancels(self.slot)
    }

    /// The sync task that runs now, `(batch_id, index)`, or `None`.
    fn running(&self) -> Option<(u64, u32)> {
        let header = self.region.slot(self.slot);
        match header.running_index.load(Ordering::SeqCst) {
            0 => None,
            index => Some((header.running_batch.load(Ordering::SeqCst), index - 1)),
        }
    }

    /// Records that sync task `index` of `batch_id` starts now, with its
    /// timeout. Returns `False` when the engine is stopping: the task must
    /// not start. Its run time counts from now to the next `begin` or
    /// `finish`.
    fn begin(&self, batch_id: u64, index: u32, timeout: f64) -> bool {
        if self.region.stop_requested() {
            return false;
        }
        let now = Instant::now();
        self.times().begin(index as usize, now);
        let header = self.region.slot(self.slot);
        let now = self.monotonic(now);
        header.running_batch.store(batch_id, Ordering::SeqCst);
        header.running_since_ms.store(now, Ordering::SeqCst);
        header
            .running_deadline_ms
            .store(deadline(now, timeout), Ordering::SeqCst);
        header.running_index.store(index + 1, Ordering::SeqCst);
        true
    }

    /// Reports tasks `start .. start + count` of `batch_id` finished: those
    /// in `records` with their `(index, outcome, delay_ms, message,
    /// traceback)`, the others succeeded. Records may also name tasks outside
    /// the range. Wakes the dispatcher unless `wake` is false (it then reads
    /// the report at its next wake-up or tick). `last`: the batch's final
    /// report (run-time histograms then go out if the actor is about to
    /// idle). Waits (GIL released) if the ring is full; never fails for
    /// size (big reports are split over several frames).
    #[pyo3(signature = (batch_id, start, count, records, wake = true, last = true))]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "PyO3 extracts arguments as owned values"
    )]
    #[expect(clippy::too_many_arguments, reason = "one report, field by field")]
    fn finish(
        &self,
        py: Python<'_>,
        batch_id: u64,
        start: u32,
        count: u32,
        records: Vec<PyRecord>,
        wake: bool,
        last: bool,
    ) -> PyResult<()> {
        self.region
            .slot(self.slot)
            .running_index
            .store(0, Ordering::SeqCst);
        let now = Instant::now();
        let work_us = {
            let mut times = self.times();
            times.end(now);
            times.take_work_us()
        };
        let parsed = self::records(&records)?;
        let idle = last && !self.region.task_ring(self.slot).has_frame();
        self.send_run_times(py, idle, now)?;
        let range = Range {
            start,
            count,
            work_us,
            parallel: 1,
        };
        // A last report of a batch whose tasks were all reported already
        // carries only the run times: no empty result frame for a batch the
        // dispatcher may have closed.
        if count > 0 || !parsed.is_empty() {
            self.send_results(py, batch_id, range, &parsed)?;
        }
        if wake {
            region::signal_event(self.region.results_event());
        }
        Ok(())
    }

    /// An async task `index` of `batch_id` starts now. Returns `False` when
    /// the engine is stopping (it must not start). Tells the dispatcher at
    /// once, without waking it: should the event loop block, the tasks that
    /// were running are known.
    fn start_async(
        &self,
        py: Python<'_>,
        batch_id: u64,
        index: u32,
        timeout: f64,
    ) -> PyResult<bool> {
        if self.region.stop_requested() {
            return Ok(false);
        }
        let due = deadline(self.monotonic(Instant::now()), timeout);
        let mut buffer = self.buffer();
        frame::write_started(&mut buffer, batch_id, &[(index, due)]);
        self.write(py, &buffer)?;
        Ok(true)
    }

    /// An async task `index` of `batch_id` ended after `seconds`, with
    /// `outcome` (and its delay and texts, or its return value as JSON).
    /// Written at once, without waking the dispatcher (`wake` does, once per
    /// group of these). `last`: the batch has no more async tasks running
    /// (run times go out first).
    #[pyo3(signature = (batch_id, index, outcome, delay_ms, message, traceback, seconds, last = false, value = Vec::new()))]
    #[expect(clippy::too_many_arguments, reason = "one record, field by field")]
    fn done_async(
        &self,
        py: Python<'_>,
        batch_id: u64,
        index: u32,
        outcome: u8,
        delay_ms: u64,
        message: String,
        traceback: String,
        seconds: f64,
        last: bool,
        value: Vec<u8>,
    ) -> PyResult<()> {
        let work_us = {
            let mut times = self.times();
            if outcome != Outcome::NotStarted as u8 {
                times.observe_in(batch_id, index as usize, seconds);
            }
            if last {
                times.forget(batch_id);
            }
            times.take_work_us()
        };
        if last {
            self.send_run_times(py, true, Instant::now())?;
        }
        let record = [(index, outcome, delay_ms, message, traceback, value)];
        let parsed = self::records(&record)?;
        let range = Range {
            start: 0,
            count: 0,
            work_us,
            parallel: self.parallel.load(Ordering::Relaxed),
        };
        self.send_results(py, batch_id, range, &parsed)
    }

    /// Wakes the dispatcher to read what was written.
    fn wake(&self) {
        region::signal_event(self.region.results_event());
    }
}

/// The deadline of a run started at `now` (monotonic ms) with `timeout`
/// seconds, 0 for none.
fn deadline(now: u64, timeout: f64) -> u64 {
    if timeout > 0.0 {
        now + (timeout * 1000.0).ceil() as u64
    } else {
        0
    }
}

impl ActorEnd {
    fn times(&self) -> std::sync::MutexGuard<'_, RunTimes> {
        self.times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn monotonic(&self, now: Instant) -> u64 {
        let (base, base_ms) = self.clock;
        base_ms + now.duration_since(base).as_millis() as u64
    }

    /// Sends the run-time histograms when due (about once a second, and
    /// before the actor idles), ahead of the results they belong with, so a
    /// dispatcher that stops once every result is in has them too.
    fn send_run_times(&self, py: Python<'_>, idle: bool, now: Instant) -> PyResult<()> {
        let Some(json) = self.times().take_report(idle, now) else {
            return Ok(());
        };
        let mut buffer = self.buffer();
        frame::write_run_times(&mut buffer, &json);
        if buffer.len() <= self.region.result_ring(self.slot).max_frame() {
            self.write(py, &buffer)?;
        }
        Ok(())
    }

    /// Writes result frames, as many as the records need.
    fn send_results(
        &self,
        py: Python<'_>,
        batch_id: u64,
        range: Range,
        records: &[Record<'_>],
    ) -> PyResult<()> {
        let max_frame = self.region.result_ring(self.slot).max_frame();
        let mut buffer = self.buffer();
        let mut failure = Ok(());
        frame::write_results_split(&mut buffer, max_frame, batch_id, range, records, |bytes| {
            if failure.is_ok() {
                failure = self.write(py, bytes);
            }
        });
        failure
    }

    /// Writes one frame to the result ring, without waking the dispatcher
    /// (callers do, once per report). When the ring is full it wakes it
    /// first, then waits (GIL released) for room. A frame larger than the
    /// ring cannot be written: callers keep frames below `max_frame`.
    fn write(&self, py: Python<'_>, buffer: &[u8]) -> PyResult<()> {
        let ring = self.region.result_ring(self.slot);
        if buffer.len() > ring.max_frame() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "result frame larger than the result ring",
            ));
        }
        while !ring.write_frame(&[buffer]) {
            region::signal_event(self.region.results_event());
            let length = buffer.len();
            if py.detach(|| ring.wait_for_space(length, Some(Duration::from_millis(200))))
                == Wait::Closed
            {
                break;
            }
            py.check_signals()?;
        }
        Ok(())
    }

    fn decode<'py>(&self, py: Python<'py>, bytes: &[u8]) -> PyResult<(u64, Bound<'py, PyList>)> {
        let (batch_id, records) = frame::read_tasks(bytes).map_err(|failure| {
            pyo3::exceptions::PyRuntimeError::new_err(format!(
                "actor {}: {failure} (this is a bug in flumeq)",
                self.slot
            ))
        })?;
        self.times().start_batch(
            batch_id,
            records.iter().map(|record| (record.queue, record.kind)),
        );
        let queues: Vec<Bound<'py, PyString>> = self
            .queues
            .iter()
            .map(|name| PyString::new(py, name))
            .collect();
        let list = PyList::empty(py);
        for record in records {
            let queue = queues
                .get(record.queue as usize)
                .cloned()
                .unwrap_or_else(|| PyString::new(py, "?"));
            let labels = match record.labels {
                Some(labels) => PyBytes::new(py, labels).into_any(),
                None => py.None().into_bound(py),
            };
            let task = PyTuple::new(
                py,
                [
                    PyString::new(py, record.id).into_any(),
                    PyString::new(py, record.kind).into_any(),
                    queue.into_any(),
                    PyBytes::new(py, record.payload).into_any(),
                    record.attempt.into_pyobject(py)?.into_any(),
                    record.max_retry.into_pyobject(py)?.into_any(),
                    (record.enqueued_at_ms as f64 / 1000.0)
                        .into_pyobject(py)?
                        .into_any(),
                    (record.timeout_ms as f64 / 1000.0)
                        .into_pyobject(py)?
                        .into_any(),
                    labels,
                    if record.keeps_result {
                        1u8
                    } else {
                        2 * u8::from(record.records_result)
                    }
                    .into_pyobject(py)?
                    .into_any(),
                ],
            )?;
            list.append(task)?;
        }
        Ok((batch_id, list))
    }
}

/// Asks the kernel to SIGKILL this process when its parent dies, so actors
/// and dispatchers never outlive a killed supervisor.
#[pyfunction]
fn die_with_parent() -> PyResult<()> {
    // SAFETY: prctl with integer arguments only.
    let result = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if result != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Upper bounds (seconds) of the run-time histogram buckets (+Inf follows).
#[pyfunction]
fn duration_buckets() -> Vec<f64> {
    DURATION_BUCKETS.to_vec()
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(duration_buckets, module)?)?;
    module.add_class::<PyRegion>()?;
    module.add_class::<ActorEnd>()?;
    module.add_function(wrap_pyfunction!(die_with_parent, module)?)?;
    Ok(())
}
