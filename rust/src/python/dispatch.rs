//! `run_dispatcher`: the dispatcher loop, entered from the dispatcher process.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::actor::PyRegion;
use super::errors::error;
use crate::dispatcher::{self, DispatchError, DispatcherConfig};

/// Runs the dispatcher on `region` until stopped (or drained, with `burst`).
/// Blocks without holding the GIL; returns a report dict.
#[pyfunction]
#[pyo3(signature = (region, *, url, prefix, queues, group, consumer, burst, prefetch, read_count, block_ms, shutdown_timeout_ms, dead_max_length, claim_stale_after_ms, retry_base_ms, retry_max_ms, processed_ttl_ms, registry = Vec::new(), heartbeat_ms = 0))]
#[expect(clippy::too_many_arguments, reason = "one keyword per engine setting")]
fn run_dispatcher<'py>(
    py: Python<'py>,
    region: &PyRegion,
    url: String,
    prefix: String,
    queues: Vec<(String, u32)>,
    group: String,
    consumer: String,
    burst: bool,
    prefetch: usize,
    read_count: usize,
    block_ms: u64,
    shutdown_timeout_ms: u64,
    dead_max_length: usize,
    claim_stale_after_ms: u64,
    retry_base_ms: u64,
    retry_max_ms: u64,
    processed_ttl_ms: u64,
    registry: Vec<(String, String)>,
    heartbeat_ms: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let config = DispatcherConfig {
        url,
        prefix,
        queues,
        group,
        consumer,
        burst,
        prefetch: prefetch.max(1),
        read_count: read_count.max(1),
        block_ms,
        shutdown_timeout_ms,
        dead_max_length,
        claim_stale_after_ms: claim_stale_after_ms.max(1),
        retry_base_ms,
        retry_max_ms,
        processed_ttl_ms,
        registry,
        heartbeat_ms,
    };
    let inner = region.region();
    let report = py.detach(|| dispatcher::run(inner, config));
    let report = report.map_err(|failure| match failure {
        DispatchError::Queue(failure) => error(py, "InvalidTask", failure.to_string()),
        DispatchError::Redis(failure) => error(py, "ConfigError", failure.to_string()),
        DispatchError::Config(failure) => error(py, "ConfigError", failure),
        DispatchError::Setup(failure) => error(py, "EngineError", failure.to_string()),
    })?;
    let dict = PyDict::new(py);
    dict.set_item("processed", report.processed)?;
    dict.set_item("failed", report.failed)?;
    dict.set_item("retried", report.retried)?;
    dict.set_item("dead", report.dead)?;
    dict.set_item("skipped", report.skipped)?;
    dict.set_item("handed_back", report.handed_back)?;
    dict.set_item("left_pending", report.left_pending)?;
    dict.set_item("restarts", report.restarts)?;
    Ok(dict)
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(run_dispatcher, module)?)
}
