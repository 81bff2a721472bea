//! The `PyO3` module `flumeq._core`: exports only. Each submodule registers its
//! classes and functions.

use pyo3::prelude::*;

mod actor;
mod constants;
mod dispatch;
mod errors;
mod store;

/// flumeq's Rust core.
#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    // Route the core's `log` records to Python's `logging` (logger "flumeq.core").
    let _ = pyo3_log::Logger::new(module.py(), pyo3_log::Caching::LoggersAndLevels)?.install();
    constants::register(module)?;
    store::register(module)?;
    actor::register(module)?;
    dispatch::register(module)?;
    Ok(())
}
