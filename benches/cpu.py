"""CPU per task of a drain: the engine's processes and Redis, apart.

Wall-clock rates on a shared 2-core VM swing by ±15 % between runs; CPU time
per task moves far less, so this is the bench for "did this change make the
hot path dearer?". Run it from two virtualenvs (one per build) and compare:

    python benches/cpu.py [--tasks 200000] [--processes 2] [--rounds 5]

It starts its own redis-server, enqueues no-op tasks, drains them with a
burst engine in this process, and reads the engine's CPU from
RUSAGE_CHILDREN (the actors and the dispatcher are this process's children)
and Redis's from INFO cpu. Prints the median over the rounds.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import redis

import flumeq
from flumeq.redis_server import RedisServer


def one_round(url: str, tasks: int, processes: int) -> tuple[float, float, float]:
    """(tasks/s, engine µs/task, redis µs/task) of one drain."""
    client = flumeq.Client(url)
    for start in range(0, tasks, 5000):
        count = min(5000, tasks - start)
        client.enqueue_many([("noop", {"n": start + n}) for n in range(count)], queue="cpu")
    server = redis.Redis.from_url(url)

    def redis_cpu() -> float:
        info = server.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    redis_before = redis_cpu()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    report = flumeq.Engine({"noop": lambda task: None}, url, queues=("cpu",)).run(
        processes=processes, burst=True
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert report["processed"] == tasks, report
    engine = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return tasks / wall, engine / tasks * 1e6, (redis_cpu() - redis_before) / tasks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        rounds = [one_round(server.url, args.tasks, args.processes) for _ in range(args.rounds)]
    finally:
        server.stop()
    rate, engine, red = (statistics.median(column) for column in zip(*rounds))
    print(f"{args.tasks} no-op tasks, {args.processes} processes, median of {args.rounds}")
    print("| drain tasks/s | engine CPU µs/task | Redis CPU µs/task |")
    print("|---|---|---|")
    print(f"| {rate:,.0f} | {engine:.2f} | {red:.2f} |")


if __name__ == "__main__":
    main()
