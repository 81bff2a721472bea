//! `Store`: the client's synchronous Redis access.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use redis::Value;

use super::errors::{error, redis_error};
use crate::dispatcher::now_ms;
use crate::envelope::TaskRef;
use crate::keys::{validate_queue, Keys};
use crate::streams::client::SyncStore;

/// The pid the id generator was last seeded for: `fork` copies the
/// generator's state, so a child (and its siblings) would draw the parent's
/// ids. Checked once per enqueue call, and reseeded from the OS in a new
/// process.
static SEEDED_FOR: AtomicU32 = AtomicU32::new(0);

fn reseed_after_fork() {
    let pid = std::process::id();
    if SEEDED_FOR.swap(pid, Ordering::Relaxed) != pid {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom(2) writes at most `seed.len()` bytes into `seed`.
        let got = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let seed = if got == 8 {
            u64::from_le_bytes(seed)
        } else {
            // No entropy syscall: the pid and the clock still differ per process.
            u64::from(pid) ^ (crate::dispatcher::now_ms() << 20)
        };
        fastrand::seed(seed);
    }
}

/// A new random task id: 32 lowercase hex digits (a UUID4 without dashes).
/// Call `reseed_after_fork` first, once per batch of ids.
fn new_task_id() -> String {
    let mut value = fastrand::u128(..);
    value = (value & !(0xf << 76)) | (0x4 << 76);
    value = (value & !(0x3 << 62)) | (0x2 << 62);
    format!("{value:032x}")
}

/// Synchronous Redis access for `flumeq.Client`.
#[pyclass(module = "flumeq._core", name = "Store", frozen)]
pub struct Store {
    inner: Mutex<SyncStore>,
}

impl Store {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        call: impl FnOnce(&mut SyncStore) -> redis::RedisResult<T> + Send,
    ) -> PyResult<T> {
        let result = py.detach(|| {
            let mut store = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            call(&mut store)
        });
        result.map_err(|failure| redis_error(py, &failure))
    }
}

#[pymethods]
impl Store {
    #[new]
    #[pyo3(signature = (url, prefix = "flumeq", timeout = 5.0))]
    fn new(py: Python<'_>, url: &str, prefix: &str, timeout: f64) -> PyResult<Self> {
        let store = SyncStore::new(url, prefix, Duration::from_secs_f64(timeout.max(0.001)))
            .map_err(|failure| error(py, "ConfigError", failure.to_string()))?;
        Ok(Self {
            inner: Mutex::new(store),
        })
    }

    /// Round trip to Redis.
    fn ping(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, SyncStore::ping)
    }

    /// Appends tasks to `queue` (or schedules them for `due_ms`). `items` are
    /// `(type, payload_json, task_id or None, idempotent)`; a missing id is
    /// generated. The other options apply to all items. Returns `(task_id,
    /// entry_id)` pairs in order (entry id `""` when scheduled). With
    /// `unique_key` (one item only) raises `DuplicateTask` when the key is held.
    /// `result_ttl_ms > 0` keeps each task's outcome that long once it ended;
    /// `retention_ms > 0` a summary of it (`Keys::completed`).
    /// With `tick = (entry, tick_ms)` (one item only) the task is a cron
    /// entry's tick: appended only if no later or equal tick of the entry
    /// was, in one script; an empty list says it was enqueued already.
    #[pyo3(signature = (queue, items, max_retry, timeout_ms, deadline_ms = None, labels = None, unique_key = None, unique_ttl_ms = 3_600_000, due_ms = 0, result_ttl_ms = 0, tick = None, retention_ms = 0))]
    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors Client.enqueue's options"
    )]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "PyO3 extracts arguments as owned values"
    )]
    fn enqueue(
        &self,
        py: Python<'_>,
        queue: &str,
        items: Vec<(String, Vec<u8>, Option<String>, bool)>,
        max_retry: u32,
        timeout_ms: u64,
        deadline_ms: Option<u64>,
        labels: Option<&[u8]>,
        unique_key: Option<&str>,
        unique_ttl_ms: u64,
        due_ms: u64,
        result_ttl_ms: u64,
        tick: Option<(String, u64)>,
        retention_ms: u64,
    ) -> PyResult<Vec<(String, String)>> {
        validate_queue(queue).map_err(|failure| error(py, "InvalidTask", failure.to_string()))?;
        if (unique_key.is_some() || tick.is_some()) && items.len() != 1 {
            return Err(error(
                py,
                "InvalidTask",
                "unique_key and tick apply to one task at a time".to_owned(),
            ));
        }
        reseed_after_fork();
        let ids: Vec<String> = items
            .iter()
            .map(|(_, _, id, _)| id.clone().unwrap_or_else(new_task_id))
            .collect();
        let enqueued_at_ms = now_ms();
        let tasks: Vec<TaskRef<'_>> = items
            .iter()
            .zip(&ids)
            .map(|((kind, payload, _, idempotent), id)| TaskRef {
                id,
                kind,
                payload,
                attempt: 0,
                max_retry,
                timeout_ms,
                enqueued_at_ms,
                deadline_ms,
                labels,
                unique_key,
                idempotent: *idempotent,
                result_ttl_ms,
                retention_ms,
            })
            .collect();
        if let Some((entry, tick_ms)) = &tick {
            let appended = self.with(py, |store| {
                store.enqueue_tick(queue, &tasks[0], entry, *tick_ms)
            })?;
            return Ok(appended
                .map(|entry_id| (ids[0].clone(), entry_id))
                .into_iter()
                .collect());
        }
        let entries: Vec<String> = if let Some(key) = unique_key {
            match self.with(py, |store| {
                store.enqueue_unique(queue, &tasks[0], key, unique_ttl_ms, due_ms)
            })? {
                Some(entry) => vec![entry],
                None => {
                    return Err(error(
                        py,
                        "DuplicateTask",
                        format!(
                        "task {:?}: unique_key {key:?} is held by a live task in queue {queue:?}",
                        tasks[0].kind
                    ),
                    ))
                }
            }
        } else if due_ms > 0 {
            self.with(py, |store| store.schedule(queue, &tasks, due_ms))?;
            vec![String::new(); tasks.len()]
        } else {
            self.with(py, |store| store.enqueue(queue, &tasks))?
        };
        Ok(ids.into_iter().zip(entries).collect())
    }

    /// Waits up to `block_ms` (GIL released) for ids of tasks that ended
    /// after `cursor` on `queue`'s `ended` stream; returns the new cursor and
    /// the ids (none on timeout). `cursor` `""` returns at once with the
    /// stream's last id, the cursor a waiter starts from.
    fn read_ended(
        &self,
        py: Python<'_>,
        queue: &str,
        cursor: &str,
        block_ms: u64,
        count: usize,
    ) -> PyResult<(String, Vec<String>)> {
        self.with(py, |store| store.read_ended(queue, cursor, block_ms, count))
    }

    /// Takes or keeps (for `ttl_ms`) the scheduler leases of these cron
    /// entries for `holder`, in one script; returns which it holds. With
    /// `ttl_ms` 0 it lets go of those it holds instead.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "PyO3 extracts arguments as owned values"
    )]
    fn cron_leases(
        &self,
        py: Python<'_>,
        entries: Vec<String>,
        holder: &str,
        ttl_ms: u64,
    ) -> PyResult<Vec<bool>> {
        self.with(py, |store| store.cron_leases(&entries, holder, ttl_ms))
    }

    /// Moves dead letters back to the stream (all, or those with these task ids).
    #[pyo3(signature = (queue, ids = None))]
    fn requeue_dead(&self, py: Python<'_>, queue: &str, ids: Option<Vec<String>>) -> PyResult<u64> {
        let ids = ids.unwrap_or_default();
        self.with(py, |store| store.requeue_dead(queue, &ids))
    }

    /// Cancels task `task_id` of `queue` (see `SyncStore::cancel`); returns
    /// how many of its entries were `(delayed, ready, held by an engine)`.
    fn cancel(
        &self,
        py: Python<'_>,
        queue: &str,
        task_id: &str,
        group: &str,
    ) -> PyResult<(u64, u64, u64)> {
        let found = self.with(py, |store| store.cancel(queue, task_id, group))?;
        Ok((found.delayed, found.ready, found.held))
    }

    /// Appends task-history events to `queue`'s events stream and keeps it
    /// within `cap` events (see `SyncStore::record_events`); returns the
    /// events dropped for the bound.
    fn record_events(
        &self,
        py: Python<'_>,
        queue: &str,
        count: u32,
        events: &[u8],
        cap: u64,
    ) -> PyResult<u64> {
        self.with(py, |store| store.record_events(queue, count, events, cap))
    }

    /// Acknowledges written entries of `queue`'s events stream: `(entry
    /// id, events)` pairs (see `SyncStore::ack_events`).
    #[expect(
        clippy::needless_pass_by_value,
        reason = "PyO3 extracts arguments as owned values"
    )]
    fn ack_events(
        &self,
        py: Python<'_>,
        queue: &str,
        group: &str,
        entries: Vec<(String, u32)>,
    ) -> PyResult<u64> {
        self.with(py, |store| store.ack_events(queue, group, &entries))
    }

    /// Deletes all dead letters of `queue`; returns how many there were.
    fn purge_dead(&self, py: Python<'_>, queue: &str) -> PyResult<u64> {
        self.with(py, |store| store.purge_dead(queue))
    }

    /// Runs `commands` (each a list of byte-string arguments) in one
    /// pipeline and returns their replies: bulk strings as `bytes`, arrays as
    /// lists, maps as lists of pairs, and a refused command as a
    /// `RedisCommandError` instance in its place (not raised). For the admin
    /// tools; the task path has its own typed calls.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "PyO3 extracts arguments as owned values"
    )]
    fn pipeline<'py>(
        &self,
        py: Python<'py>,
        commands: Vec<Vec<Vec<u8>>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let replies = self.with(py, |store| store.pipeline(&commands))?;
        replies.iter().map(|reply| to_python(py, reply)).collect()
    }

    /// Drops the connection (a new one is made on the next call).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |store| {
            store.disconnect();
            Ok(())
        })
    }
}

/// A Redis reply as a Python value.
fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Nil => py.None().into_bound(py),
        Value::Int(number) => number.into_pyobject(py)?.into_any(),
        Value::BulkString(bytes) => PyBytes::new(py, bytes).into_any(),
        Value::Array(items) | Value::Set(items) => {
            let items: PyResult<Vec<_>> = items.iter().map(|item| to_python(py, item)).collect();
            PyList::new(py, items?)?.into_any()
        }
        Value::Map(pairs) => {
            let mut list = Vec::with_capacity(pairs.len());
            for (key, item) in pairs {
                list.push(PyTuple::new(
                    py,
                    [to_python(py, key)?, to_python(py, item)?],
                )?);
            }
            PyList::new(py, list)?.into_any()
        }
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => {
            text.into_pyobject(py)?.into_any()
        }
        Value::Okay => "OK".into_pyobject(py)?.into_any(),
        Value::Double(number) => number.into_pyobject(py)?.into_any(),
        Value::Boolean(flag) => flag.into_pyobject(py)?.to_owned().into_any(),
        Value::Attribute { data, .. } => to_python(py, data)?,
        Value::ServerError(failure) => error(py, "RedisCommandError", failure.to_string())
            .into_value(py)
            .into_bound(py)
            .into_any(),
        other => format!("{other:?}").into_pyobject(py)?.into_any(),
    })
}

/// A new task id (what the client uses when none is given).
#[pyfunction(name = "new_task_id")]
fn py_new_task_id() -> String {
    reseed_after_fork();
    new_task_id()
}

/// The Redis keys flumeq uses under `prefix`: the global ones, plus those of
/// `queue` when given (for the admin tools, so key names live in one place).
#[pyfunction]
#[pyo3(signature = (prefix, queue = None))]
fn key_names(prefix: &str, queue: Option<&str>) -> std::collections::HashMap<&'static str, String> {
    let keys = Keys::new(prefix);
    let mut names = std::collections::HashMap::from([
        ("queues", keys.queues()),
        ("paused", keys.paused()),
        ("cron_entries", keys.cron_entries()),
        ("cron_lease", keys.cron_lease("")),
        ("workers", keys.workers()),
        ("worker", keys.worker("")),
    ]);
    if let Some(queue) = queue {
        names.insert("stream", keys.stream(queue));
        names.insert("dead", keys.dead(queue));
        names.insert("delayed", keys.delayed(queue));
        names.insert("stats", keys.stats(queue));
        names.insert("durations", keys.durations(queue));
        names.insert("done", keys.done(queue, ""));
        names.insert("result", keys.result(queue, ""));
        names.insert("ended", keys.ended(queue));
        names.insert("events", keys.events(queue));
        names.insert("completed", keys.completed(queue));
        names.insert("completed_expiry", keys.completed_expiry(queue));
        names.insert("cron", keys.cron_ticks(queue));
        names.insert("cancels", keys.cancels(queue));
    }
    names
}

/// Why `name` cannot be a queue name, or `None` when it can.
#[pyfunction]
fn queue_problem(name: &str) -> Option<String> {
    validate_queue(name)
        .err()
        .map(|failure| failure.to_string())
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Store>()?;
    module.add_function(wrap_pyfunction!(queue_problem, module)?)?;
    module.add_function(wrap_pyfunction!(key_names, module)?)?;
    module.add_function(wrap_pyfunction!(py_new_task_id, module)?)
}

#[cfg(test)]
mod tests {
    use super::new_task_id;

    #[test]
    fn task_ids_are_uuid4_hex() {
        let id = new_task_id();
        assert_eq!(id.len(), 32);
        assert_eq!(&id[12..13], "4");
        assert!(matches!(&id[16..17], "8" | "9" | "a" | "b"));
        assert_ne!(new_task_id(), id);
    }
}
