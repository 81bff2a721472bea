"""What every system's bench handler does, identically.

Imported inside each system's own virtualenv (and by flumeq's actors). A
handler calls `finish(payload)` after `work(kind)`: the run is counted in
process memory and a background thread adds the counts (and latencies) to
Redis every 20 ms, so completion detection costs no Redis round trip per
task. `flush_now()` is for workers that run each job in a throwaway process
(RQ's forking worker), where a background thread never gets to flush.

Environment: BENCH_URL (Redis), BENCH_KIND (noop | cpu | io).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from typing import Any

import redis

URL = os.environ.get("BENCH_URL", "redis://127.0.0.1:6379/0")
KIND = os.environ.get("BENCH_KIND", "noop")
DONE = "bench:done"
FIRST = "bench:first"
LAST = "bench:last"
LATENCY = "bench:latency"
BLOCK = b"x" * 1024


def _calibrate() -> int:
    """How many SHA-256 rounds of 1 KiB take about 1 ms here."""
    rounds = 200
    while True:
        started = time.perf_counter()
        for _ in range(rounds):
            hashlib.sha256(BLOCK).digest()
        elapsed = time.perf_counter() - started
        if elapsed > 0.005:
            return max(1, int(rounds * 0.001 / elapsed))
        rounds *= 2


CPU_ROUNDS = int(os.environ.get("BENCH_CPU_ROUNDS", "0")) or _calibrate()


def work(kind: str = KIND) -> None:
    """The task body: nothing, ~1 ms of hashing, or a 10 ms sleep."""
    if kind == "cpu":
        for _ in range(CPU_ROUNDS):
            hashlib.sha256(BLOCK).digest()
    elif kind == "io":
        time.sleep(0.01)


async def work_async(kind: str = KIND) -> None:
    """`work` for async handlers (the sleep does not block the loop)."""
    if kind == "io":
        await asyncio.sleep(0.01)
    else:
        work(kind)


class _Tally:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.count = 0
        self.first: float | None = None
        self.last = 0.0
        self.latencies: list[float] = []
        self.client = redis.Redis.from_url(URL)
        self.pending = threading.Event()
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()

    def add(self, sent_at: float | None) -> None:
        now = time.time()
        with self.lock:
            self.count += 1
            self.last = now
            if self.first is None:
                self.first = now
            if sent_at is not None:
                self.latencies.append(now - sent_at)
        self.pending.set()

    def flush(self) -> None:
        with self.lock:
            count, first, last, latencies = self.count, self.first, self.last, self.latencies
            self.count, self.latencies = 0, []
        if not count:
            return
        pipe = self.client.pipeline(transaction=False)
        if first is not None:
            pipe.set(FIRST, repr(first), nx=True)
        if latencies:
            pipe.rpush(LATENCY, *latencies)
        pipe.zadd(LAST, {"t": last}, gt=True)  # the latest completion, over all processes
        pipe.incrby(DONE, count)
        pipe.execute()

    def _loop(self) -> None:
        # Sleeps until something was counted, so an idle worker's CPU is its own.
        while True:
            self.pending.wait()
            time.sleep(0.02)
            self.pending.clear()
            with contextlib.suppress(redis.RedisError):
                self.flush()


_tally: _Tally | None = None


def tally() -> _Tally:
    global _tally
    if _tally is None or _tally.pid != os.getpid():
        _tally = _Tally()  # one per process, made after any fork
    return _tally


def finish(payload: Any) -> None:
    """Counts one finished run (with its latency when the payload has `sent_at`)."""
    sent_at = payload.get("sent_at") if isinstance(payload, dict) else None
    tally().add(sent_at)


def flush_now() -> None:
    tally().flush()
