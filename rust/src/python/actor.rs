//! `Region` (created by the supervisor before it forks) and `ActorEnd` (an
//! actor process's side of its two rings).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use super::errors::error;
use crate::frame::{self, Failure, FailureKind};
use crate::region::{self, Region, RegionLayout, SLOT_RUNNING};
use crate::ring::Wait;
use crate::timing::{RunTimes, DURATION_BUCKETS};

/// Longest error text and traceback kept per failure (bytes).
const MAX_TEXT: usize = 16 * 1024;

/// The shared memory of one engine. Create it before forking any process.
#[pyclass(module = "flumeq._core", name = "Region", frozen)]
pub struct PyRegion {
    inner: Arc<Region>,
}

#[pymethods]
impl PyRegion {
    #[new]
    #[pyo3(signature = (processes, task_ring_bytes = 8 << 20, result_ring_bytes = 1 << 20))]
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
}

fn clip(text: &str) -> &[u8] {
    let bytes = text.as_bytes();
    if bytes.len() <= MAX_TEXT {
        return bytes;
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &bytes[..end]
}

#[pymethods]
impl ActorEnd {
    /// Marks the slot running with this process's pid.
    fn started(&self) {
        let header = self.region.slot(self.slot);
        header.pid.store(std::process::id(), Ordering::SeqCst);
        header.running_index.store(0, Ordering::SeqCst);
        header.state.store(SLOT_RUNNING, Ordering::SeqCst);
    }

    /// Waits for the next batch (without holding the GIL). Returns
    /// `(batch_id, tasks)` or `None` once the dispatcher closed the ring. Each
    /// task is `(id, type, queue, payload, attempt, max_retry, enqueued_at,
    /// timeout, labels)` with times in seconds.
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

    /// Records that task `index` of `batch_id` starts now, with its timeout.
    /// Returns `False` when the engine is stopping: the task must not start.
    /// With `timed`, its run time counts from now to the next `begin` or
    /// `finish` (an async group passes `False` and reports each task with
    /// `observe`).
    #[pyo3(signature = (batch_id, index, timeout, timed = true))]
    fn begin(&self, batch_id: u64, index: u32, timeout: f64, timed: bool) -> bool {
        if self.region.stop_requested() {
            return false;
        }
        let now = Instant::now();
        if timed {
            self.times().begin(index as usize, now);
        } else {
            self.times().end(now);
        }
        let header = self.region.slot(self.slot);
        let (base, base_ms) = self.clock;
        let now = base_ms + now.duration_since(base).as_millis() as u64;
        header.running_batch.store(batch_id, Ordering::SeqCst);
        header.running_since_ms.store(now, Ordering::SeqCst);
        let deadline = if timeout > 0.0 {
            now + (timeout * 1000.0).ceil() as u64
        } else {
            0
        };
        header.running_deadline_ms.store(deadline, Ordering::SeqCst);
        header.running_index.store(index + 1, Ordering::SeqCst);
        true
    }

    /// Reports tasks `start .. start + count` of `batch_id` finished.
    /// `failures` lists `(index, kind, delay_ms, message, traceback)` for the
    /// ones that did not succeed. Waits (GIL released) if the ring is full.
    #[pyo3(signature = (batch_id, start, count, failures))]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "PyO3 extracts arguments as owned values"
    )]
    fn finish(
        &self,
        py: Python<'_>,
        batch_id: u64,
        start: u32,
        count: u32,
        failures: Vec<(u32, u8, u64, String, String)>,
    ) -> PyResult<()> {
        self.region
            .slot(self.slot)
            .running_index
            .store(0, Ordering::SeqCst);
        let now = Instant::now();
        self.times().end(now);
        let mut records = Vec::with_capacity(failures.len());
        for (index, kind, delay_ms, message, traceback) in &failures {
            let kind = FailureKind::from_byte(*kind).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err(format!("unknown failure kind {kind}"))
            })?;
            records.push(Failure {
                index: *index,
                kind,
                delay_ms: *delay_ms,
                message: clip(message),
                traceback: clip(traceback),
            });
        }
        let mut buffer = self
            .buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Run times go out about once a second, and before the actor idles;
        // ahead of the results, so a dispatcher that stops once every result
        // is in has them too.
        // One wake-up of the dispatcher carries both frames.
        let idle = !self.region.task_ring(self.slot).has_frame();
        let report = self.times().take_report(idle, now);
        if let Some(json) = report {
            frame::write_durations(&mut buffer, &json);
            if buffer.len() <= self.region.result_ring(self.slot).max_frame() {
                self.write(py, &buffer)?;
            }
        }
        frame::write_results(&mut buffer, batch_id, start, count, &records);
        self.write(py, &buffer)?;
        region::signal_event(self.region.results_event());
        Ok(())
    }

    /// Adds a run of task `index` of the current batch that took `seconds`
    /// (async tasks, which run together, are timed one by one in Python).
    fn observe(&self, index: usize, seconds: f64) {
        self.times().observe(index, seconds);
    }
}

impl ActorEnd {
    fn times(&self) -> std::sync::MutexGuard<'_, RunTimes> {
        self.times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one frame to the result ring, without waking the dispatcher
    /// (the caller does, once per call of `finish`). When the ring is full it
    /// wakes it first, then waits (GIL released) for room.
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
        let (batch_id, records) = frame::read_tasks(bytes)
            .map_err(|failure| pyo3::exceptions::PyRuntimeError::new_err(failure.to_string()))?;
        self.times()
            .start_batch(records.iter().map(|record| (record.queue, record.kind)));
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
