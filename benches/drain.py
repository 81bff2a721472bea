"""Enqueue and drain no-op tasks: flumeq beside the raw Redis ceiling.

The ceiling is a hand-written redis-py + hiredis loop with no task framework:
XADD pipelined 500 at a time, then XREADGROUP COUNT 500 + pipelined XACK/XDEL.
Both run in this one process tree against one private redis-server, so the
numbers compare. Usage:

    python benches/drain.py [--tasks 100000] [--processes 2] [--rounds 3]

Needs `pip install -r benches/requirements.txt` (redis, hiredis).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import redis

import flumeq
from flumeq.redis_server import RedisServer

PAYLOAD = {"user": 12345, "action": "noop"}


def raw_enqueue(url: str, tasks: int) -> float:
    r = redis.Redis.from_url(url)
    body = orjson.dumps(PAYLOAD)
    started = time.perf_counter()
    for offset in range(0, tasks, 500):
        pipe = r.pipeline(transaction=False)
        for n in range(offset, min(tasks, offset + 500)):
            pipe.xadd("raw:stream", {"id": str(n), "type": "noop", "payload": body})
        pipe.execute()
    return time.perf_counter() - started


def raw_drain(url: str, tasks: int) -> float:
    r = redis.Redis.from_url(url)
    r.xgroup_create("raw:stream", "g", id="0", mkstream=True)
    done = 0
    started = time.perf_counter()
    while done < tasks:
        reply = r.xreadgroup("g", "c", {"raw:stream": ">"}, count=500, block=1000)
        if not reply:
            break
        ids = [entry_id for entry_id, _ in reply[0][1]]
        for _, fields in reply[0][1]:
            orjson.loads(fields[b"payload"])
        pipe = r.pipeline(transaction=False)
        pipe.xack("raw:stream", "g", *ids)
        pipe.xdel("raw:stream", *ids)
        pipe.execute()
        done += len(ids)
    elapsed = time.perf_counter() - started
    assert done == tasks, f"raw drain saw {done} of {tasks}"
    return elapsed


def noop(task: flumeq.Task) -> None:
    pass


def flumeq_enqueue(url: str, tasks: int) -> float:
    client = flumeq.Client(url)
    items = [("noop", PAYLOAD) for _ in range(tasks)]
    started = time.perf_counter()
    client.enqueue_many(items, queue="bench")
    return time.perf_counter() - started


def flumeq_drain(url: str, tasks: int, processes: int) -> float:
    started = time.perf_counter()
    report = flumeq.Engine({"noop": noop}, url, queues=("bench",)).run(
        processes=processes, burst=True
    )
    elapsed = time.perf_counter() - started
    assert report["processed"] == tasks, report
    return elapsed


def median_rate(tasks: int, run: Callable[[], float], rounds: int) -> tuple[float, float, float]:
    rates = [tasks / run() for _ in range(rounds)]
    return statistics.median(rates), min(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n, rounds = args.tasks, args.rounds

    with RedisServer() as server:
        url = server.url
        flush = redis.Redis.from_url(url).flushall

        def fresh(step: Callable[[], float]) -> Callable[[], float]:
            def run() -> float:
                flush()
                return step()

            return run

        rows = []
        raw_enq = median_rate(n, fresh(lambda: raw_enqueue(url, n)), rounds)

        def raw_cycle() -> float:
            flush()
            raw_enqueue(url, n)
            return raw_drain(url, n)

        raw_dr = median_rate(n, raw_cycle, rounds)
        fq_enq = median_rate(n, fresh(lambda: flumeq_enqueue(url, n)), rounds)

        def fq_cycle() -> float:
            flush()
            flumeq_enqueue(url, n)
            return flumeq_drain(url, n, args.processes)

        fq_dr = median_rate(n, fq_cycle, rounds)
        redis_version = redis.Redis.from_url(url).info()["redis_version"]
        rows.append(("raw redis-py+hiredis (ceiling)", raw_enq, raw_dr))
        rows.append((f"flumeq ({args.processes} processes)", fq_enq, fq_dr))

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?"
    )
    print(f"\n{n} no-op tasks, median of {rounds} (min-max); {os.cpu_count()} cores, {cpu}")
    print(
        f"redis {redis_version}, Python {platform.python_version()}, flumeq {flumeq.__version__} @ {commit}\n"
    )
    print("| system | enqueue tasks/s | drain tasks/s |")
    print("|---|---|---|")
    for name, enq, dr in rows:
        print(
            f"| {name} | {enq[0]:,.0f} ({enq[1]:,.0f}-{enq[2]:,.0f}) | {dr[0]:,.0f} ({dr[1]:,.0f}-{dr[2]:,.0f}) |"
        )
    print(f"| flumeq / raw | {fq_enq[0] / raw_enq[0]:.2f}x | {fq_dr[0] / raw_dr[0]:.2f}x |")


if __name__ == "__main__":
    main()
