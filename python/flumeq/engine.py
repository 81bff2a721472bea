"""``Engine``: the supervisor of one engine's processes.

Start order (stop order is the reverse):

1. the shared region (rings + eventfds) is created, in this process;
2. the actor processes are forked, one per ring slot;
3. the dispatcher process is forked; it runs the Rust dispatcher (tokio,
   Redis connections) and is the only process of the engine with threads.

This process never starts a Rust thread, so it can fork a replacement actor at
any time without the dangers of forking a multi-threaded process. It only
waits on its children and on signals: SIGINT/SIGTERM ask the dispatcher for a
graceful stop (no new tasks; running ones finish within ``shutdown_timeout``);
a second signal stops at once, leaving unfinished tasks pending in Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from types import FrameType
from typing import Any, Callable, Optional, Union

import multiprocess
import orjson
from multiprocess.connection import wait

from . import _core
from ._version import __version__
from .actor import actor_main
from .admin import Admin
from .client import resolve_url
from .errors import ConfigError, EngineError
from .task import Task

__all__ = ["Engine", "queue_weights"]

log = logging.getLogger("flumeq.engine")

Handler = Callable[[Task], Any]
Queues = Union[Mapping[str, int], tuple[str, ...], list[str]]

# Slot states shared with the dispatcher (rust/src/region.rs).
SLOT_RECLAIMED = 3
#: How often an engine refreshes its worker-registry entry (seconds); the
#: entry expires after five missed beats.
HEARTBEAT = 2.0


def queue_weights(queues: Queues) -> list[tuple[str, int]]:
    """``queues`` (names, or a mapping of name to weight) as checked
    ``(name, weight)`` pairs; a ``ConfigError`` says what is wrong."""
    if isinstance(queues, str):
        queues = (queues,)
    pairs = list(queues.items()) if isinstance(queues, Mapping) else [(name, 1) for name in queues]
    if not pairs:
        raise ConfigError("queues must name at least one queue")
    for name, weight in pairs:
        if not isinstance(name, str):
            raise ConfigError(f"queue names must be strings, got {name!r}")
        problem = _core.queue_problem(name)
        if problem:
            raise ConfigError(problem)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ConfigError(f"queue {name!r}: weight must be an integer >= 1, got {weight!r}")
    return pairs


def _metrics_main(url: str, prefix: str, group: str, port: int, queues: list[str]) -> None:
    """Entry point of the metrics process (``metrics_port``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _core.die_with_parent()
    # prometheus-client loads here only: importing flumeq stays light (fewer
    # modules and objects for every producer's garbage collector).
    from .metrics import serve_metrics  # noqa: PLC0415

    serve_metrics(Admin(url, prefix=prefix, group=group), port, queues=queues)


def _dispatcher_main(region: _core.Region, settings: dict[str, Any], report: Any) -> None:
    """Entry point of the dispatcher process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: region.request_stop())
    _core.die_with_parent()
    try:
        outcome = _core.run_dispatcher(region, **settings)
    except BaseException as error:
        report.send(("error", f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from None
    report.send(("ok", outcome))


class Engine:
    """Runs handlers for the tasks of some queues.

    ``handlers`` maps task types to callables taking a ``Task``, plain or
    ``async def`` (async tasks of a batch run concurrently in each actor, at
    most ``concurrency`` at once). ``queues`` is a sequence of names, or a
    mapping of name to weight: when several queues have work, each read takes
    from them in proportion to their weights.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        url: Optional[str] = None,
        *,
        queues: Queues = ("default",),
        group: str = "flumeq",
        claim_stale_after: float = 300.0,
        retry_base: float = 1.0,
        retry_max: float = 600.0,
        shutdown_timeout: float = 30.0,
        processed_ttl: float = 86400.0,
        prefix: str = "flumeq",
        consumer: Optional[str] = None,
        prefetch: int = 512,
        read_count: int = 1000,
        block: float = 0.5,
        ring_bytes: int = 8 << 20,
        dead_max_length: int = 100_000,
        concurrency: int = 100,
        metrics_port: Optional[int] = None,
    ) -> None:
        if not isinstance(handlers, Mapping):
            raise ConfigError("handlers must be a mapping of task type to callable")
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
        self.url = resolve_url(url)
        self.queues = queue_weights(queues)
        self.group = group
        self.claim_stale_after = float(claim_stale_after)
        self.retry_base = float(retry_base)
        self.retry_max = float(retry_max)
        self.shutdown_timeout = float(shutdown_timeout)
        self.processed_ttl = float(processed_ttl)
        self.prefix = prefix
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.prefetch = prefetch
        self.read_count = read_count
        self.block = block
        self.ring_bytes = ring_bytes
        self.dead_max_length = dead_max_length
        self.concurrency = concurrency
        if metrics_port is not None and (
            isinstance(metrics_port, bool)
            or not isinstance(metrics_port, int)
            or not 0 < metrics_port < 65536
        ):
            raise ConfigError(f"metrics_port must be a TCP port number, got {metrics_port!r}")
        self.metrics_port = metrics_port
        self._region: Optional[_core.Region] = None
        self._signals = 0

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
            "prefetch": self.prefetch,
            "read_count": self.read_count,
            "block_ms": round(self.block * 1000),
            "shutdown_timeout_ms": round(self.shutdown_timeout * 1000),
            "dead_max_length": self.dead_max_length,
            "claim_stale_after_ms": max(1, round(self.claim_stale_after * 1000)),
            "retry_base_ms": round(self.retry_base * 1000),
            "retry_max_ms": round(self.retry_max * 1000),
            "processed_ttl_ms": max(1, round(self.processed_ttl * 1000)),
        }

    @staticmethod
    def _check_port(port: int) -> None:
        """Fails at once when the metrics port cannot be listened on."""
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError as error:
                raise ConfigError(f"metrics_port {port}: cannot listen on it ({error})") from None

    def stop(self) -> None:
        """Asks a running engine to stop gracefully (as SIGTERM does)."""
        if self._region is not None:
            self._region.request_stop()

    def _on_signal(self, signum: int, _frame: Optional[FrameType]) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "%s: stopping gracefully (send again to stop at once)", signal.Signals(signum).name
            )
            self.stop()

    def run(self, processes: Optional[int] = None, burst: bool = False) -> dict[str, int]:
        """Serves tasks until SIGINT/SIGTERM (or, with ``burst``, until no task
        is ready, in flight or delayed), then returns counts: processed,
        failed, retried, dead, skipped, handed_back, left_pending, restarts."""
        count = processes if processes is not None else (os.cpu_count() or 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"processes must be an integer >= 1, got {processes!r}")
        if self.metrics_port:
            self._check_port(self.metrics_port)
        region = _core.Region(count, self.ring_bytes)
        self._region = region
        self._signals = 0
        context = multiprocess.get_context("fork")
        queue_names = [name for name, _ in self.queues]

        def start_actor(slot: int) -> Any:
            region.mark_starting(slot)
            process = context.Process(
                target=actor_main,
                args=(region, slot, self.handlers, queue_names, self.concurrency),
                name=f"flumeq-actor-{slot}",
                daemon=True,
            )
            process.start()
            return process

        actors = [start_actor(slot) for slot in range(count)]
        report_reader, report_writer = context.Pipe(duplex=False)
        dispatcher = context.Process(
            target=_dispatcher_main,
            args=(region, self._settings(burst, count), report_writer),
            name="flumeq-dispatcher",
            daemon=True,
        )
        dispatcher.start()
        report_writer.close()
        metrics = None
        if self.metrics_port:
            metrics = context.Process(
                target=_metrics_main,
                args=(self.url, self.prefix, self.group, self.metrics_port, queue_names),
                name="flumeq-metrics",
                daemon=True,
            )
            metrics.start()
        log.info(
            "engine %s serving %s with %d process(es)%s",
            self.consumer,
            ", ".join(queue_names),
            count,
            " (burst)" if burst else "",
        )
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self._supervise(region, actors, dispatcher, start_actor)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._region = None
            region.close_all()
            outcome: tuple[str, Any] = (
                report_reader.recv()
                if report_reader.poll()
                else ("error", "dispatcher exited without a report")
            )
            report_reader.close()
            # Tasks the dispatcher left pending (shutdown timeout) must not
            # finish unrecorded: stop their actors now. Otherwise actors exit
            # by themselves once they see the closed rings.
            left = outcome[0] != "ok" or outcome[1].get("left_pending", 0) > 0
            for actor in actors:
                if left:
                    actor.kill()
                actor.join(timeout=5)
                if actor.is_alive():
                    actor.kill()
                    actor.join()
            if dispatcher.is_alive():
                dispatcher.kill()
                dispatcher.join()
            if metrics is not None:
                metrics.terminate()
                metrics.join(timeout=5)
        if outcome[0] != "ok":
            if self._signals > 1:
                log.warning("stopped at once: no report; unfinished tasks stay pending in Redis")
                return {}
            raise EngineError(
                f"the dispatcher failed (exit code {dispatcher.exitcode}): {outcome[1]}"
            )
        return dict(outcome[1])

    def _supervise(
        self,
        region: _core.Region,
        actors: list[Any],
        dispatcher: Any,
        start_actor: Callable[[int], Any],
    ) -> None:
        """Waits on the children until the dispatcher exits, replacing actors that die."""
        lost: set[int] = set()
        while dispatcher.is_alive():
            if self._signals > 1:
                log.warning("second signal: stopping now; unfinished tasks stay pending in Redis")
                dispatcher.kill()
                for actor in actors:
                    actor.kill()
                break
            sentinels = [dispatcher.sentinel] + [
                actors[slot].sentinel for slot in range(len(actors)) if slot not in lost
            ]
            wait(sentinels, timeout=0.05 if lost else 1.0)
            for slot, actor in enumerate(actors):
                if slot in lost or actor.is_alive() or region.closing():
                    continue
                actor.join()
                log.warning(
                    "actor %d (pid %s) exited with code %s; replacing it",
                    slot,
                    actor.pid,
                    actor.exitcode,
                )
                region.mark_lost(slot, actor.exitcode if actor.exitcode is not None else -9)
                lost.add(slot)
            for slot in sorted(lost):
                if region.slot_state(slot) == SLOT_RECLAIMED:
                    actors[slot] = start_actor(slot)
                    lost.discard(slot)
        dispatcher.join()
