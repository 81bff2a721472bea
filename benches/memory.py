"""Dispatcher memory against queue length: DESIGN promises it stays flat.

For each queue length, enqueue that many tasks, start an engine (2 actors,
handlers sleeping 1 ms so a backlog stays in Redis), and sample the
dispatcher's RSS after it has worked for a few seconds. The dispatcher only
ever holds what its actors' credit allows (prefetch × actors), so its memory
should not follow the queue.

    python benches/memory.py [--lengths 10000,100000,1000000] [--seconds 3]

Needs psutil and redis-py (benches/requirements.txt). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time

import psutil
import redis

import flumeq
from flumeq.redis_server import RedisServer

ENGINE = """
import sys, time
import flumeq
flumeq.Engine({"sleep": lambda task: time.sleep(0.001)}, sys.argv[1], queues=("mem",)).run(processes=2)
"""


def dispatcher_of(engine: psutil.Process) -> psutil.Process:
    """The engine's child that holds Redis connections (actors hold none)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for child in engine.children():
            try:
                if child.net_connections(kind="tcp"):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise RuntimeError("no dispatcher process found")


def measure(url: str, length: int, seconds: float) -> tuple[float, float, int]:
    """(dispatcher RSS MB, its USS MB, tasks left in the queue) for one length."""
    client = flumeq.Client(url)
    for start in range(0, length, 10_000):
        count = min(10_000, length - start)
        client.enqueue_many([("sleep", {"n": start + n}) for n in range(count)], queue="mem")
    engine = subprocess.Popen([sys.executable, "-c", textwrap.dedent(ENGINE), url])
    try:
        dispatcher = dispatcher_of(psutil.Process(engine.pid))
        time.sleep(seconds)
        info = dispatcher.memory_full_info()
        left = client.stats("mem")["ready"]
    finally:
        engine.terminate()
        engine.wait(timeout=60)
    # Start the next length from an empty queue.
    redis.Redis.from_url(url).flushall()
    return info.rss / 2**20, info.uss / 2**20, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="10000,100000,1000000")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    lengths = [int(text) for text in args.lengths.split(",")]
    server = RedisServer().start()
    rows = []
    try:
        for length in lengths:
            rss, uss, left = measure(server.url, length, args.seconds)
            rows.append((length, left, rss, uss))
    finally:
        server.stop()
    print(f"dispatcher memory after {args.seconds:g} s of work, 2 actors, prefetch 512")
    print("| queue length | still ready when sampled | dispatcher RSS MB | dispatcher USS MB |")
    print("|---|---|---|---|")
    for length, left, rss, uss in rows:
        print(f"| {length:,} | {left:,} | {rss:.1f} | {uss:.1f} |")


if __name__ == "__main__":
    main()
