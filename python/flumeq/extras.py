"""The optional parts of flumeq and the extras that bring them.

``pip install flumeq`` is enough to enqueue and to run workers. The dashboard
needs ``flumeq[web]`` (starlette, uvicorn, jinja2); the Prometheus endpoint
needs ``flumeq[metrics]`` (prometheus-client); ``flumeq[all]`` brings both.
Tracing (``flumeq.tracing``) needs ``flumeq[otel]`` (opentelemetry-api); the
task history in PostgreSQL (``flumeq.History``, ``Engine(history=...)``)
needs ``flumeq[postgres]`` (psycopg 3).
"""

from __future__ import annotations

from importlib.util import find_spec

from .errors import ConfigError

__all__ = ["EXTRAS", "missing", "require"]

#: Each extra and the modules it brings.
EXTRAS: dict[str, tuple[str, ...]] = {
    "web": ("starlette", "uvicorn", "jinja2"),
    "metrics": ("prometheus_client",),
    "otel": ("opentelemetry",),
    "postgres": ("psycopg",),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported (without importing them)."""
    return [module for module in EXTRAS[extra] if find_spec(module) is None]


def require(extra: str, feature: str) -> None:
    """Raises ``ConfigError`` naming the extra to install when ``feature``
    cannot work for want of it."""
    absent = missing(extra)
    if absent:
        raise ConfigError(
            f"{feature} needs the '{extra}' extra (missing: {', '.join(absent)}): "
            f"pip install 'flumeq[{extra}]'"
        )
