//! Maps core errors to the exception classes of `flumeq.errors`.
//!
//! The classes are defined in Python (one hierarchy under `FlumeqError`, with
//! stdlib bases callers already catch) and looked up when raised.

use pyo3::prelude::*;
use pyo3::types::PyType;

/// Builds an instance of `flumeq.errors.<name>` with `message`.
pub fn error(py: Python<'_>, name: &str, message: String) -> PyErr {
    let class = py
        .import("flumeq.errors")
        .and_then(|module| module.getattr(name))
        .and_then(|class| class.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(class) => PyErr::from_type(class, message),
        Err(lookup) => lookup,
    }
}

/// A Redis failure as a Python exception: connection problems become
/// `RedisUnavailable`, anything else `RedisCommandError`.
pub fn redis_error(py: Python<'_>, failure: &redis::RedisError) -> PyErr {
    let unavailable = failure.is_io_error()
        || failure.is_connection_refusal()
        || failure.is_connection_dropped()
        || failure.is_timeout()
        || failure.is_unrecoverable_error()
        || crate::connection::is_demoted(failure);
    let name = if unavailable {
        "RedisUnavailable"
    } else {
        "RedisCommandError"
    };
    error(py, name, failure.to_string())
}
