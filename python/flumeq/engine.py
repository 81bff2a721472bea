"""``Engine``: what an engine serves and how; ``Engine.run`` hands it to the
supervisor (``supervisor.py``), which runs the engine's processes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import orjson

from . import _core, hooks, limits
from ._version import __version__
from .app import App
from .client import checked_queue, resolve_url
from .cron import Cron, checked_entries
from .errors import ConfigError
from .extras import require
from .history import dsn as history_dsn
from .supervisor import Supervisor
from .task import Task

__all__ = ["Engine", "queue_weights"]

log = logging.getLogger("flumeq.engine")

Handler = Callable[[Task], Any]
Queues = Union[Mapping[str, int], tuple[str, ...], list[str]]

#: How often an engine refreshes its worker-registry entry (seconds); the
#: entry expires after five missed beats.
HEARTBEAT = 2.0


def queue_weights(queues: Queues, strict: bool = False) -> list[tuple[str, int]]:
    """``queues`` (names, or a mapping of name to weight) as checked
    ``(name, weight)`` pairs; a ``ConfigError`` says what is wrong. For
    strict priority a mapping is ordered by weight, highest first."""
    if isinstance(queues, str):
        queues = (queues,)
    pairs = list(queues.items()) if isinstance(queues, Mapping) else [(name, 1) for name in queues]
    if not pairs:
        raise ConfigError("queues must name at least one queue")
    for name, weight in pairs:
        checked_queue(name)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ConfigError(f"queue {name!r}: weight must be an integer >= 1, got {weight!r}")
    if strict and isinstance(queues, Mapping):
        pairs.sort(key=lambda pair: -pair[1])  # ties keep their order
    return pairs


def _count(name: str, value: Any) -> int:
    """``value`` when it is an integer >= 1, else a ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class Engine:
    """Runs handlers for the tasks of some queues.

    ``handlers`` is an ``App`` (its tasks, and by default its tasks'
    queues), or maps task types to callables taking a ``Task``, plain or
    ``async def`` (async tasks of a batch run concurrently in each actor, at
    most ``concurrency`` at once). ``queues`` is a sequence of names, or a
    mapping of name to weight: when several queues have work, the reads take
    from them in proportion to their weights (a smooth round robin carried
    from read to read: every queue gets its turn, none starves). With ``strict=True`` the order is the
    priority instead (for a mapping: higher weight first): a queue's tasks
    are taken only while every queue before it has none ready, and each
    actor holds at most one task ahead of those it runs, so a task of a
    higher queue waits for at most one lower-queue task per process (plus
    those running). ``cron`` entries (``flumeq.Cron``,
    plus an app's ``@app.cron`` ones) are enqueued on their schedules, each
    tick once across every engine carrying them.

    A cancelled task (``Client.cancel``) that still runs ``cancel_grace``
    seconds after its handler was told (``flumeq.Cancelled`` raised in a sync
    handler, ``CancelledError`` in an async one) has its actor process
    killed and replaced, the way a hard ``timeout`` does.

    ``rate_limits`` (task type to ``"N/s"``, ``"N/m"`` or ``"N/h"``) and
    ``concurrency_limits`` (task type to most running at once) hold across
    every engine on the same Redis, checked once per read batch. A task over
    a limit waits in its queue's delayed set, its attempt unchanged, counted
    as ``throttled`` (see ``flumeq.limits`` for the burst and lease times).

    ``history`` (a PostgreSQL DSN, ``flumeq[postgres]``) records every
    task's lifecycle there, off the task path: events wait in Redis (at
    most ``history_buffer`` per queue; past it the oldest are dropped and
    counted) and the engine's history process writes them in batches.
    PostgreSQL slow or down never slows the queue. ``history_retention``
    (days) purges older rows. See ``flumeq.history``. Without PostgreSQL,
    tasks enqueued with ``retention`` leave a summary in Redis once they
    end, at most ``retention_max`` per queue (the soonest to expire go first).
    """

    def __init__(
        self,
        handlers: Union[App, Mapping[str, Handler]],
        url: Optional[str] = None,
        *,
        queues: Optional[Queues] = None,
        group: str = "flumeq",
        claim_stale_after: float = 300.0,
        retry_base: float = 1.0,
        retry_max: float = 600.0,
        shutdown_timeout: float = 30.0,
        processed_ttl: float = 86400.0,
        prefix: str = "flumeq",
        consumer: Optional[str] = None,
        prefetch: int = _core.DEFAULT_PREFETCH,
        read_count: int = _core.DEFAULT_READ_COUNT,
        block: float = _core.DEFAULT_BLOCK_MS / 1000,
        ring_bytes: int = _core.DEFAULT_TASK_RING_BYTES,
        dead_max_length: int = _core.DEFAULT_DEAD_MAX_LENGTH,
        concurrency: int = _core.DEFAULT_CONCURRENCY,
        metrics_port: Optional[int] = None,
        metrics_host: str = "127.0.0.1",
        middleware: Iterable[Any] = (),
        cron: Iterable[Cron] = (),
        strict: bool = False,
        cancel_grace: float = _core.DEFAULT_CANCEL_GRACE_MS / 1000,
        rate_limits: Optional[Mapping[str, str]] = None,
        concurrency_limits: Optional[Mapping[str, int]] = None,
        history: Optional[str] = None,
        history_retention: Optional[float] = None,
        history_buffer: int = _core.DEFAULT_HISTORY_BUFFER,
        retention_max: int = _core.DEFAULT_RETENTION_MAX_LENGTH,
    ) -> None:
        own_middleware = hooks.checked(middleware)
        entries = list(cron) if not isinstance(cron, Cron) else [cron]
        if isinstance(handlers, App):
            app = handlers
            own_middleware = [*app.middleware, *own_middleware]
            entries = [*app.cron_entries, *entries]
            if queues is None:
                queues = app.queues()
            if url is None:
                url = app.url
            if prefix == "flumeq":
                prefix = app.prefix
            handlers = app.handlers()
        if queues is None:
            queues = ("default",)
        if not isinstance(handlers, Mapping):
            raise ConfigError("handlers must be a flumeq.App or a mapping of task type to callable")
        for type_, handler in handlers.items():
            if not isinstance(type_, str) or not type_:
                raise ConfigError(f"handler keys must be task type strings, got {type_!r}")
            if not callable(handler):
                raise ConfigError(f"handler for {type_!r} is not callable: {handler!r}")
        for name, value in (
            ("claim_stale_after", claim_stale_after),
            ("retry_base", retry_base),
            ("retry_max", retry_max),
            ("shutdown_timeout", shutdown_timeout),
            ("processed_ttl", processed_ttl),
            ("block", block),
            ("cancel_grace", cancel_grace),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if ring_bytes < 65536 or ring_bytes % 4096:
            raise ConfigError(
                f"ring_bytes must be a multiple of 4096 and >= 65536, got {ring_bytes}"
            )
        self.handlers = dict(handlers)
        #: Run hooks around every handler (see ``flumeq.hooks``).
        self.middleware = own_middleware
        self.url = resolve_url(url)
        if not isinstance(strict, bool):
            raise ConfigError(f"strict must be True or False, got {strict!r}")
        self.queues = queue_weights(queues, strict)
        self.group = group
        self.claim_stale_after = float(claim_stale_after)
        self.retry_base = float(retry_base)
        self.retry_max = float(retry_max)
        self.shutdown_timeout = float(shutdown_timeout)
        #: Seconds a cancelled task may run on before its actor is killed.
        self.cancel_grace = float(cancel_grace)
        self.processed_ttl = float(processed_ttl)
        self.prefix = prefix
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.prefetch = prefetch
        self.read_count = read_count
        self.block = block
        self.ring_bytes = ring_bytes
        self.dead_max_length = dead_max_length
        self.concurrency = concurrency
        #: Strict priority: a queue's tasks are taken only while every queue
        #: before it has none ready (see ``queues``).
        self.strict = strict
        if metrics_port is not None and (
            isinstance(metrics_port, bool)
            or not isinstance(metrics_port, int)
            or not 0 < metrics_port < 65536
        ):
            raise ConfigError(f"metrics_port must be a TCP port number, got {metrics_port!r}")
        if metrics_port:
            require("metrics", "metrics_port")
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        #: Cron entries whose ticks this engine enqueues while it holds
        #: their leases (see ``flumeq.cron``).
        self.cron = checked_entries(entries)
        served = {name for name, _ in self.queues}
        for entry in self.cron:
            if entry.queue in served and entry.type not in self.handlers:
                log.warning(
                    "cron entry %r enqueues %r to queue %r, which this engine serves "
                    "without a handler for it",
                    entry.name,
                    entry.type,
                    entry.queue,
                )
        #: Global limits: ``(type, tasks, period ms)`` and ``(type, most running)``.
        self.rate_limits = limits.checked_rates(rate_limits)
        self.concurrency_limits = limits.checked_concurrency(concurrency_limits)
        limited = {kind for kind, _, _ in self.rate_limits}
        limits.warn_unserved(limited | {kind for kind, _ in self.concurrency_limits}, self.handlers)
        #: PostgreSQL DSN of the task history (see ``flumeq.history``), or None.
        self.history = None if history is None else history_dsn.checked(history)
        if history_retention is not None and (
            isinstance(history_retention, bool)
            or not isinstance(history_retention, (int, float))
            or history_retention <= 0
        ):
            raise ConfigError(
                f"history_retention must be a number of days > 0, got {history_retention!r}"
            )
        #: Days of history kept (older rows are purged), or None: kept for ever.
        self.history_retention = history_retention
        #: Most history events each queue holds in Redis while PostgreSQL is away.
        self.history_buffer = _count("history_buffer", history_buffer)
        #: Most summaries of completed tasks (``retention``) each queue keeps.
        self.retention_max = _count("retention_max", retention_max)
        self._region: Optional[_core.Region] = None

    def _settings(self, burst: bool, processes: int) -> dict[str, Any]:
        registry = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "group": self.group,
            "queues": orjson.dumps([name for name, _ in self.queues]).decode(),
            "processes": str(processes),
            "started": str(round(time.time() * 1000)),
            "burst": "1" if burst else "0",
            "version": __version__,
        }
        if self.metrics_port:
            registry["metrics_port"] = str(self.metrics_port)
        return {
            "registry": list(registry.items()),
            "heartbeat_ms": round(HEARTBEAT * 1000),
            "url": self.url,
            "prefix": self.prefix,
            "queues": self.queues,
            "group": self.group,
            "consumer": self.consumer,
            "burst": burst,
            "strict": self.strict,
            "prefetch": self.prefetch,
            "read_count": self.read_count,
            "block_ms": round(self.block * 1000),
            "shutdown_timeout_ms": round(self.shutdown_timeout * 1000),
            "cancel_grace_ms": round(self.cancel_grace * 1000),
            "dead_max_length": self.dead_max_length,
            "claim_stale_after_ms": max(1, round(self.claim_stale_after * 1000)),
            "retry_base_ms": round(self.retry_base * 1000),
            "retry_max_ms": round(self.retry_max * 1000),
            "processed_ttl_ms": max(1, round(self.processed_ttl * 1000)),
            "rate_limits": self.rate_limits,
            "concurrency_limits": self.concurrency_limits,
            "history": self.history is not None,
            "history_buffer": self.history_buffer,
            "retention_max_length": self.retention_max,
        }

    def _check_metrics(self) -> None:
        """Fails at once when the metrics endpoint cannot work: its extra is
        not installed, or the port cannot be listened on."""
        require("metrics", "metrics_port")
        host, port = self.metrics_host, self.metrics_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                raise ConfigError(
                    f"metrics_port {port} on {host}: cannot listen on it ({error})"
                ) from None

    def stop(self) -> None:
        """Asks a running engine to stop gracefully (as SIGTERM does)."""
        if self._region is not None:
            self._region.request_stop()

    def run_handlers(self) -> dict[str, Handler]:
        """The handlers the actors call: with the middleware's run hooks
        around them (the process's global middleware first), or as given."""
        return hooks.wrap_handlers(self.handlers, hooks.combined(self.middleware))

    def run(self, processes: Optional[int] = None, burst: bool = False) -> dict[str, int]:
        """Serves tasks until SIGINT/SIGTERM or ``stop()`` (or, with ``burst``,
        until no task is ready, in flight or delayed), then returns counts:
        processed, failed, retried, dead, skipped, handed_back, left_pending,
        restarts (of actors), cancelled, throttled (held back by a limit) and dispatcher_restarts.

        Run from a thread other than the main one, the engine installs no
        signal handlers; stop it with ``stop()``.
        """
        count = processes if processes is not None else (os.cpu_count() or 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"processes must be an integer >= 1, got {processes!r}")
        if self.metrics_port:
            self._check_metrics()
        region = _core.Region(count, self.ring_bytes)
        self._region = region
        try:
            return Supervisor(self, region, self._settings(burst, count), burst).run()
        finally:
            self._region = None
