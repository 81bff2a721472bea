"""The developer API's numbers, flumeq and peers side by side in one run.

    python benches/api.py [--n N] [--rounds R] [--skip io]

Same rules as benches/run.py (one private redis-server, each system in its
own virtualenv from benches/setup_peers.sh, its public API, its defaults).
Workloads:

1. **async enqueue**: one process, 1,000 coroutines, each awaiting one
   enqueue after another: flumeq's `AsyncClient.enqueue`, arq's
   `enqueue_job`, taskiq's `kiq`, SAQ's `enqueue`; and, for scale,
   flumeq's synchronous single-call `Client.enqueue`.
2. **result round trip** at light load: enqueue one task, wait for its
   result, then the next: flumeq's `TaskInfo.result()`, Celery's
   `AsyncResult.get()` on its Redis backend, arq's `job.result()`.
3. **I/O-bound async throughput** (flumeq): 10 ms `asyncio.sleep` tasks,
   2 processes, concurrency 100: the bound is 200 in flight / 10 ms = 20k/s.

The drain through an `@app.task` against a plain mapping, and the cost of a
no-op middleware, are in benches/cpu.py. Writes benches/RESULTS-api.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PEERS, SYSTEMS, Bench, System  # noqa: E402

from flumeq.redis_server import RedisServer  # noqa: E402

ASYNC_PEERS = ["flumeq", "arq", "taskiq", "saq"]
RESULT_PEERS = ["flumeq", "celery (prefork)", "arq"]
#: Round trips per system: arq polls every 0.5 s, so it gets fewer.
TRIPS = {"arq": 20}


def system(key: str) -> System:
    return next(item for item in SYSTEMS if item.key == key)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def async_enqueue(bench: Bench, item: System, n: int) -> float:
    bench.redis.flushall()
    out = bench.driver(item, "aenqueue", "--n", str(n), "--coroutines", "1000")
    return float(out["tasks"]) / float(out["seconds"])


def round_trips(bench: Bench, item: System, n: int) -> tuple[list[float], str]:
    bench.redis.flushall()
    argvs = bench.driver(item, "results-argv")
    workers = [
        subprocess.Popen(
            argv,
            cwd=PEERS,
            env=bench.env(item, "noop"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for argv in argvs
    ]
    try:
        out = bench.driver(item, "roundtrip", "--n", str(n))
    finally:
        bench.stop_workers(workers)
    return [value * 1000 for value in out["latencies"]], str(out["settings"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="tasks per enqueue run")
    parser.add_argument("--peer-n", type=int, default=20_000, help="tasks per peer enqueue run")
    parser.add_argument("--trips", type=int, default=1000, help="result round trips")
    parser.add_argument("--io-n", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=float, default=120.0)
    parser.add_argument("--skip", default="", help="comma-separated: async,results,io")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    lines = [
        "# Developer API: flumeq and peers side by side",
        "",
        f"{dt.date.today()}, {platform.processor() or platform.machine()}, "
        f"CPython {platform.python_version()}; `python benches/api.py` "
        f"(median of {args.rounds}, min–max).",
        "",
    ]
    with RedisServer() as server:
        bench = Bench(server, args)
        if "async" not in skip:
            lines += [
                "## Async enqueue: 1,000 coroutines in one process",
                "",
                "| system | tasks/s | tasks per run |",
                "|---|---|---|",
            ]
            for key in ASYNC_PEERS:
                item = system(key)
                reason = item.missing()
                if reason:
                    lines.append(f"| {key} | {reason} | |")
                    continue
                n = args.n if key == "flumeq" else args.peer_n
                rates = [async_enqueue(bench, item, n) for _ in range(args.rounds)]
                lines.append(
                    f"| {key} `{'AsyncClient.enqueue' if key == 'flumeq' else 'async'}` "
                    f"| {_range(rates)} | {n:,} |"
                )
                print(lines[-1], flush=True)
            flumeq = system("flumeq")
            rates = [bench.enqueue(flumeq, args.peer_n, bulk=False) for _ in range(args.rounds)]
            lines.append(
                f"| flumeq `Client.enqueue` (sync, one call each) | {_range(rates)} "
                f"| {args.peer_n:,} |"
            )
            lines.append("")
            print(lines[-2], flush=True)
        if "results" not in skip:
            lines += [
                "## Result round trip at light load (one task at a time)",
                "",
                "| system | p50 ms | p99 ms | trips | how |",
                "|---|---|---|---|---|",
            ]
            for key in RESULT_PEERS:
                item = system(key)
                reason = item.missing()
                if reason:
                    lines.append(f"| {key} | {reason} | | | |")
                    continue
                n = TRIPS.get(key, args.trips)
                values, how = round_trips(bench, item, n)
                lines.append(
                    f"| {key} | {percentile(values, 0.5):.2f} | {percentile(values, 0.99):.2f} "
                    f"| {n} | {how} |"
                )
                print(lines[-1], flush=True)
            lines.append("")
        if "io" not in skip:
            item = system("flumeq")
            rates = []
            for _ in range(args.rounds):
                rate, _, note = bench.drain(item, args.io_n, 2, "io")
                if note:
                    print("io:", note)
                rates.append(rate)
            lines += [
                "## I/O-bound async tasks (10 ms sleep), 2 processes, concurrency 100",
                "",
                "| system | tasks/s | bound |",
                "|---|---|---|",
                f"| flumeq | {_range(rates)} | 20,000 |",
                "",
            ]
            print(lines[-2], flush=True)
    report = "\n".join(lines)
    print(report)
    (HERE / "RESULTS-api.md").write_text(report + "\n")


def _range(values: list[float]) -> str:
    middle = statistics.median(values)
    return f"{middle:,.0f} ({min(values):,.0f}–{max(values):,.0f})"


if __name__ == "__main__":
    main()
