"""Celery 5 with the Redis broker: task.delay(); `celery worker` prefork or solo."""

from __future__ import annotations

import os
import sys
from typing import Any

import common
from celery import Celery

NAME = "celery"
POOL = os.environ.get("BENCH_CELERY_POOL", "prefork")
SETTINGS = (
    "Redis broker, ignore_result, defaults otherwise (prefetch x4); "
    + ("-P prefork -c P" if POOL == "prefork" else "-P solo, P workers")
    + "; --without-gossip/mingle/heartbeat"
)
BULK = None
ASYNC = False

app = Celery("bench", broker=common.URL)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.work")
def work_task(payload: dict[str, Any]) -> None:
    common.work()
    common.finish(payload)


# Results need a result backend: a second app, so the drain rows keep
# ignore_result. Its worker: `celery -A sys_celery:results worker`.
results = Celery("bench_results", broker=common.URL, backend=common.URL)
results.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@results.task(name="bench.echo")
def echo(n: int) -> int:
    return n + 1


RESULTS = "echo.delay(n).get() on the Redis result backend (pub/sub wake-up), prefork -c 1"


class RoundTrip:
    def call(self, n: int) -> Any:
        return echo.delay(n).get(timeout=30)

    def close(self) -> None:
        pass


def results_worker() -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "sys_celery:results",
            "worker",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-P",
            "prefork",
            "-c",
            "1",
        ]
    ]


class Producer:
    def __init__(self) -> None:
        work_task.delay  # noqa: B018 (the app connects on first send)

    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        for payload in payloads:
            work_task.delay(payload)

    def close(self) -> None:
        pass


def worker(procs: int) -> list[list[str]]:
    base = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "sys_celery",
        "worker",
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if POOL == "solo":
        return [[*base, "-P", "solo", "-n", f"solo{i}@%h"] for i in range(procs)]
    return [[*base, "-P", "prefork", "-c", str(procs)]]
