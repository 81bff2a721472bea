"""The package version and the core's interface revision.

The version has one source, ``rust/Cargo.toml``: maturin gives it to the
wheel's metadata, and the compiled core reports it here. The interface
revision is what these Python files expect of ``flumeq._core``; the core
carries its own, and ``import flumeq`` refuses a core that does not match
(a stale build next to newer Python files), naming both.
"""

from __future__ import annotations

#: Bump together with ``CORE_INTERFACE`` in ``rust/src/python/constants.rs``
#: whenever the Python files need a changed core.
CORE_INTERFACE = 4

try:
    from . import _core
except ImportError as error:
    raise ImportError(
        f"flumeq's compiled core (flumeq._core, interface {CORE_INTERFACE}) cannot be "
        f"loaded: {error}. Install flumeq from its wheel (pip install flumeq, for "
        "CPython >= 3.9 on Linux x86_64 with glibc >= 2.17), or build it from source "
        "with 'pip install .' (needs a Rust toolchain)."
    ) from error

if getattr(_core, "CORE_INTERFACE", None) != CORE_INTERFACE:
    raise ImportError(
        f"flumeq's Python files expect core interface {CORE_INTERFACE}, but the loaded "
        f"flumeq._core ({_core.__file__}, built from flumeq "
        f"{getattr(_core, '__version__', 'before 0.2')}) has interface "
        f"{getattr(_core, 'CORE_INTERFACE', 'none')}: rebuild it ('pip install .', or "
        "scripts/setup.sh in a checkout) or reinstall the wheel."
    )

__version__: str = _core.__version__
