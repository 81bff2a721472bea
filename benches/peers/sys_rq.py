"""RQ 2: Queue.enqueue / enqueue_many; `rq worker` (forking) or SimpleWorker."""

from __future__ import annotations

import os
import sys
from typing import Any

import common
import redis
from rq import Queue

NAME = "rq"
CLASS = os.environ.get("BENCH_RQ_WORKER", "fork")
SETTINGS = (
    "default Worker: forks per job (counts flushed per job, as the job's process exits); "
    "one process per worker"
    if CLASS == "fork"
    else "SimpleWorker: runs jobs in the worker process; one process per worker"
)
BULK = "enqueue_many"
ASYNC = False


def work_task(payload: dict[str, Any]) -> None:
    common.work()
    common.finish(payload)
    if CLASS == "fork":
        common.flush_now()  # the job's child process exits before any thread could flush


class Producer:
    def __init__(self) -> None:
        self.queue = Queue("bench", connection=redis.Redis.from_url(common.URL))

    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        if bulk:
            for offset in range(0, len(payloads), 1000):
                chunk = payloads[offset : offset + 1000]
                self.queue.enqueue_many([Queue.prepare_data(work_task, (p,)) for p in chunk])
        else:
            for payload in payloads:
                self.queue.enqueue(work_task, payload)

    def close(self) -> None:
        pass


def worker(procs: int) -> list[list[str]]:
    argv = [
        sys.executable,
        "-m",
        "rq.cli",
        "worker",
        "--url",
        common.URL,
        "--logging_level",
        "WARNING",
    ]
    if CLASS == "simple":
        argv += ["--worker-class", "rq.worker.SimpleWorker"]
    return [[*argv, "--name", f"bench-{i}-{os.getpid()}", "bench"] for i in range(procs)]
