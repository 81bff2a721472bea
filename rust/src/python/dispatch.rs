//! `run_dispatcher`: the dispatcher loop, entered from the dispatcher process.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::actor::PyRegion;
use super::errors::error;
use crate::dispatcher::{self, DispatchError, Report, Settings};

/// Runs the dispatcher on `region` until stopped (or drained, with
/// `settings["burst"]`). `settings` is a dict with one item per field of
/// the core's `Settings`. Blocks without holding the GIL; returns this
/// dispatcher life's counts.
#[pyfunction]
fn run_dispatcher<'py>(
    py: Python<'py>,
    region: &PyRegion,
    settings: Settings,
) -> PyResult<Bound<'py, PyDict>> {
    let inner = region.region();
    let report = py.detach(|| dispatcher::run(inner, settings));
    let report = report.map_err(|failure| match failure {
        DispatchError::Queue(failure) => error(py, "InvalidTask", failure.to_string()),
        DispatchError::Config(failure) => error(py, "ConfigError", failure),
        DispatchError::Setup(failure) => error(py, "EngineError", failure.to_string()),
    })?;
    report_dict(py, &report)
}

/// A report as a dict of its counts.
pub fn report_dict<'py>(py: Python<'py>, report: &Report) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, count) in Report::NAMES.iter().zip(report.to_array()) {
        dict.set_item(*name, count)?;
    }
    Ok(dict)
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(run_dispatcher, module)?)
}
