//! Constants of the core, exported so Python never copies them: outcomes,
//! slot states, size bounds and the engine's defaults.

use pyo3::prelude::*;

use crate::dispatcher::{defaults, Report};
use crate::envelope::{MAX_ID_BYTES, MAX_TYPE_BYTES};
use crate::outcome::{Outcome, MAX_RESULT_BYTES, MAX_TEXT_BYTES};
use crate::region::{SLOT_LOST, SLOT_RECLAIMED, SLOT_RUNNING, SLOT_STARTING};

/// What the core offers the Python files; `python/flumeq/_version.py` holds
/// the revision they expect. Bump both when either side changes the other
/// depends on.
pub const CORE_INTERFACE: u32 = 4;

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    // The one source of the version: rust/Cargo.toml.
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    module.add("CORE_INTERFACE", CORE_INTERFACE)?;
    module.add_class::<Outcome>()?;
    for (name, value) in [
        ("SLOT_STARTING", SLOT_STARTING),
        ("SLOT_RUNNING", SLOT_RUNNING),
        ("SLOT_LOST", SLOT_LOST),
        ("SLOT_RECLAIMED", SLOT_RECLAIMED),
    ] {
        module.add(name, value)?;
    }
    for (name, value) in [
        ("MAX_ID_BYTES", MAX_ID_BYTES),
        ("MAX_TYPE_BYTES", MAX_TYPE_BYTES),
        ("MAX_TEXT_BYTES", MAX_TEXT_BYTES),
        ("MAX_RESULT_BYTES", MAX_RESULT_BYTES),
        ("MAX_HISTORY_FIELD_BYTES", crate::history::MAX_FIELD_BYTES),
        ("ENDED_MAX_LENGTH", crate::streams::writer::ENDED_MAX_LENGTH),
        ("DEFAULT_PREFETCH", defaults::PREFETCH),
        ("DEFAULT_READ_COUNT", defaults::READ_COUNT),
        ("DEFAULT_TASK_RING_BYTES", defaults::TASK_RING_BYTES),
        ("DEFAULT_RESULT_RING_BYTES", defaults::RESULT_RING_BYTES),
        ("DEFAULT_DEAD_MAX_LENGTH", defaults::DEAD_MAX_LENGTH),
        ("DEFAULT_CONCURRENCY", defaults::CONCURRENCY),
    ] {
        module.add(name, value)?;
    }
    for (name, value) in [
        ("DEFAULT_BLOCK_MS", defaults::BLOCK_MS),
        ("WRITE_GRACE_MS", defaults::WRITE_GRACE_MS),
        ("ASYNC_GRACE_MS", defaults::ASYNC_GRACE_MS),
        ("DEFAULT_CANCEL_GRACE_MS", defaults::CANCEL_GRACE_MS),
        ("CANCEL_TTL_MS", crate::keys::CANCEL_TTL_MS),
        ("DEFAULT_HISTORY_BUFFER", defaults::HISTORY_BUFFER),
        (
            "DEFAULT_RETENTION_MAX_LENGTH",
            defaults::RETENTION_MAX_LENGTH,
        ),
    ] {
        module.add(name, value)?;
    }
    module.add("REPORT_NAMES", Report::NAMES.to_vec())?;
    Ok(())
}
