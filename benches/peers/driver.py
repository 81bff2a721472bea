"""Runs one system's producer side inside that system's virtualenv.

python driver.py SYSTEM enqueue --n N [--bulk]    -> {"seconds": ...}
python driver.py SYSTEM latency --n N --rate R    -> {"seconds": ...}
python driver.py SYSTEM argv --procs P            -> [[worker argv], ...]
python driver.py SYSTEM info                      -> {"name", "settings", "bulk", "async", "version"}
python driver.py SYSTEM aenqueue --n N --coroutines C   -> {"seconds": ...}
python driver.py SYSTEM roundtrip --n N           -> {"latencies": [...], "settings": ...}
python driver.py SYSTEM results-argv              -> [[worker argv], ...] serving the echo task
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import time
from typing import Any


async def concurrent_enqueue(system: Any, args: argparse.Namespace) -> tuple[float, int]:
    """Seconds for `coroutines` coroutines to enqueue `n` tasks in all, each
    awaiting one enqueue after another."""
    producer = system.AsyncProducer()
    await producer.start()
    await producer.send({"n": -1})
    per = args.n // args.coroutines

    async def one(base: int) -> None:
        for i in range(per):
            await producer.send({"n": base + i})

    started = time.perf_counter()
    await asyncio.gather(*(one(c * per) for c in range(args.coroutines)))
    elapsed = time.perf_counter() - started
    await producer.close()
    return elapsed, per * args.coroutines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system")
    parser.add_argument(
        "action",
        choices=["enqueue", "latency", "argv", "info", "aenqueue", "roundtrip", "results-argv"],
    )
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--bulk", action="store_true")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--coroutines", type=int, default=1000)
    args = parser.parse_args()
    system = importlib.import_module(f"sys_{args.system}")
    if args.action == "argv":
        print(json.dumps(system.worker(args.procs)))
    elif args.action == "results-argv":
        argv = system.results_worker() if hasattr(system, "results_worker") else system.worker(1)
        print(json.dumps(argv))
    elif args.action == "aenqueue":
        seconds, tasks = asyncio.run(concurrent_enqueue(system, args))
        print(json.dumps({"seconds": seconds, "tasks": tasks}))
    elif args.action == "roundtrip":
        trip = system.RoundTrip()
        for n in range(20):  # connect, and let the worker warm up
            assert trip.call(n) == n + 1
        latencies = []
        for n in range(args.n):
            started = time.perf_counter()
            value = trip.call(n)
            latencies.append(time.perf_counter() - started)
            assert value == n + 1, value
        trip.close()
        print(json.dumps({"latencies": latencies, "settings": system.RESULTS}))
    elif args.action == "info":
        distribution = {"taskiq": "taskiq-redis"}.get(args.system, args.system)
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        print(
            json.dumps(
                {
                    "name": system.NAME,
                    "settings": system.SETTINGS,
                    "bulk": system.BULK,
                    "async": system.ASYNC,
                    "version": version,
                }
            )
        )
    elif args.action == "enqueue":
        producer = system.Producer()
        payloads = [{"n": i} for i in range(args.n)]
        started = time.perf_counter()
        producer.send(payloads, args.bulk)
        elapsed = time.perf_counter() - started
        producer.close()
        print(json.dumps({"seconds": elapsed}))
    else:
        producer = system.Producer()
        producer.send([{"n": -1}], False)  # connect and warm up first
        started = time.perf_counter()
        interval = 1.0 / args.rate
        for i in range(args.n):
            pause = started + i * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            producer.send([{"n": i, "sent_at": time.time()}], False)
        elapsed = time.perf_counter() - started
        producer.close()
        print(json.dumps({"seconds": elapsed}))


if __name__ == "__main__":
    main()
