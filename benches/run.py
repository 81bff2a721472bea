"""flumeq side by side with Python task queues and the raw Redis ceiling.

    python benches/run.py [--quick] [--peers flumeq,dramatiq,...] [--n N] [--rounds R]

Installs nothing. Needs `pip install -r benches/requirements.txt` in flumeq's
environment and, for the peers, `bash benches/setup_peers.sh` (one pinned
virtualenv per system, since their Redis clients conflict). A system whose
virtualenv is missing is listed with that reason.

Rules, the same for every system:
- one private redis-server (started here, on a free port), flushed before
  every run; each system's producer and workers run in that system's own
  virtualenv, through its normal public API and CLI;
- handlers count their runs in process memory and flush counts to Redis every
  20 ms (benches/peers/common.py), so completion costs no extra round trip per
  task; drain time runs from the first to the last completed task, worker
  start-up (launch to first completed task) is reported apart;
- each figure is the median of `--rounds` runs, min–max beside it.

Workloads: (1) enqueue N tasks one call each, and with the bulk API where a
system has one; (2) drain N pre-enqueued no-op tasks with 1 and 2 worker
processes; (3) CPU-bound tasks (~1 ms of SHA-256 each); (4) I/O-bound tasks
(10 ms sleep, `asyncio.sleep` where the handler is async); (5) latency at
light load (one enqueue every 5 ms, each stamped); (6) RSS per worker process
and CPU of an idle worker.

Output: a Markdown report printed and written to benches/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from flumeq.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
VENVS = HERE / ".work" / "venvs"
sys.path.insert(0, str(HERE))
import drain as raw  # noqa: E402  (the raw redis-py ceiling loops)


@dataclass
class System:
    """One row: a queue system with its settings."""

    key: str  # column label
    module: str  # benches/peers/sys_<module>.py
    env: dict[str, str] = field(default_factory=dict)
    venv: str | None = None  # None: flumeq's own environment
    unavailable: str | None = None

    @property
    def python(self) -> str:
        if self.venv is None:
            return sys.executable
        return str(VENVS / self.venv / "bin" / "python")

    def missing(self) -> str | None:
        if self.unavailable:
            return self.unavailable
        if not Path(self.python).exists():
            return f"not installed: run `bash benches/setup_peers.sh {self.venv}`"
        return None


SYSTEMS = [
    System("flumeq", "flumeq"),
    System("celery (prefork)", "celery", {"BENCH_CELERY_POOL": "prefork"}, "celery"),
    System("celery (solo)", "celery", {"BENCH_CELERY_POOL": "solo"}, "celery"),
    System("rq (fork)", "rq", {"BENCH_RQ_WORKER": "fork"}, "rq"),
    System("rq (SimpleWorker)", "rq", {"BENCH_RQ_WORKER": "simple"}, "rq"),
    System("dramatiq", "dramatiq", {}, "dramatiq"),
    System("arq", "arq", {}, "arq"),
    System("taskiq", "taskiq", {}, "taskiq"),
    System("saq", "saq", {}, "saq"),
    System("streaq", "streaq", {}, "streaq"),
    System(
        "ardiq",
        "ardiq",
        {},
        "ardiq",
        unavailable="cannot install: every ArdiQ release requires Python >= 3.12; this machine has CPython 3.11 only",
    ),
]
QUICK = ["flumeq", "dramatiq", "taskiq"]


@dataclass
class Figure:
    """Median of several measurements, with their range."""

    values: list[float]
    unit: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def show(self, scale: float = 1.0, digits: int = 0) -> str:
        if not self.values:
            return self.note or "–"
        low, high = min(self.values) * scale, max(self.values) * scale
        middle = self.median * scale
        text = f"{middle:,.{digits}f}"
        if len(self.values) > 1:
            text += f" ({low:,.{digits}f}–{high:,.{digits}f})"
        return text + (f" {self.note}" if self.note else "")


class Bench:
    def __init__(self, server: RedisServer, args: argparse.Namespace) -> None:
        self.server = server
        self.url = server.url
        self.redis = redis.Redis.from_url(self.url)
        self.args = args

    def env(self, system: System, kind: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(system.env)
        env["BENCH_URL"] = self.url
        env["BENCH_KIND"] = kind
        # A PYTHONPATH of the caller goes first: a build to compare with
        # (python/ of another checkout) runs in the same bench.
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.environ.get("PYTHONPATH"), str(PEERS)])
        )
        return env

    def driver(self, system: System, *arguments: str, kind: str = "noop") -> Any:
        done = subprocess.run(
            [system.python, str(PEERS / "driver.py"), system.module, *arguments],
            check=False,
            cwd=PEERS,
            env=self.env(system, kind),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{system.key}: driver {arguments[0]} failed:\n{done.stderr[-2000:]}"
            )
        return json.loads(done.stdout.strip().splitlines()[-1])

    def start_workers(self, system: System, procs: int, kind: str) -> list[subprocess.Popen[bytes]]:
        argvs = self.driver(system, "argv", "--procs", str(procs))
        return [
            subprocess.Popen(
                argv,
                cwd=PEERS,
                env=self.env(system, kind),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for argv in argvs
        ]

    @staticmethod
    def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
        # The measurement is over: a short grace, then SIGKILL.
        deadline = time.monotonic() + 3
        for worker in workers:
            try:
                worker.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()

    def counts(self) -> tuple[int, float | None, float | None]:
        done, first, last = (
            self.redis.pipeline()
            .get("bench:done")
            .get("bench:first")
            .zscore("bench:last", "t")
            .execute()
        )
        return int(done or 0), float(first) if first else None, last

    def wait_done(self, target: int, limit: float) -> tuple[int, float | None, float | None, bool]:
        deadline = time.monotonic() + limit
        while True:
            done, first, last = self.counts()
            if done >= target:
                return done, first, last, False
            if time.monotonic() > deadline:
                return done, first, last, True
            time.sleep(0.01)

    # -- workloads ---------------------------------------------------------

    def enqueue(self, system: System, n: int, bulk: bool) -> float:
        self.redis.flushall()
        arguments = ["enqueue", "--n", str(n)] + (["--bulk"] if bulk else [])
        return n / self.driver(system, *arguments)["seconds"]

    def drain(self, system: System, n: int, procs: int, kind: str) -> tuple[float, float, str]:
        """Returns (tasks/s, start-up seconds, note)."""
        self.redis.flushall()
        self.driver(system, "enqueue", "--n", str(n), "--bulk", kind=kind)
        launched = time.time()
        workers = self.start_workers(system, procs, kind)
        try:
            done, first, last, timed_out = self.wait_done(n, self.args.limit)
        finally:
            self.stop_workers(workers)
        if not done or first is None or last is None:
            return float("nan"), float("nan"), "no task completed"
        rate = done / max(last - first, 1e-6) if done > 1 else float("nan")
        note = f"timeout: {done}/{n} in {self.args.limit:.0f}s" if timed_out else ""
        return rate, first - launched, note

    def latency(self, system: System, n: int) -> tuple[list[float], str]:
        self.redis.flushall()
        workers = self.start_workers(system, 1, "noop")
        try:
            self.driver(system, "enqueue", "--n", "1")  # wait for the worker to be ready
            _, _, _, timed_out = self.wait_done(1, 60)
            if timed_out:
                return [], "worker did not start"
            self.redis.delete("bench:latency")
            self.driver(system, "latency", "--n", str(n), "--rate", "200")
            _, _, _, timed_out = self.wait_done(n + 2, 60)
            values = [float(v) * 1000 for v in self.redis.lrange("bench:latency", 0, -1)]
            return sorted(values), "timeout" if timed_out else ""
        finally:
            self.stop_workers(workers)

    def idle(self, system: System, seconds: float) -> tuple[float, float, int]:
        """Returns (CPU % of one core over the window, mean RSS MB per worker process, processes)."""
        self.redis.flushall()
        workers = self.start_workers(system, 2, "noop")
        try:
            self.driver(system, "enqueue", "--n", "4")
            self.wait_done(4, 60)
            time.sleep(1.0)
            processes = []
            for worker in workers:
                try:
                    root = psutil.Process(worker.pid)
                    processes += [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass

            def cpu() -> float:
                total = 0.0
                for process in processes:
                    try:
                        times = process.cpu_times()
                        total += times.user + times.system
                    except psutil.NoSuchProcess:
                        pass
                return total

            before = cpu()
            time.sleep(seconds)
            used = cpu() - before
            rss = [p.memory_info().rss / 2**20 for p in processes if p.is_running()]
            return 100 * used / seconds, statistics.mean(rss) if rss else float("nan"), len(rss)
        finally:
            self.stop_workers(workers)


def rounds(count: int, measure: Callable[[], float]) -> Figure:
    values = [measure() for _ in range(count)]
    return Figure([v for v in values if not math.isnan(v)])


def redis_benchmark(port: int, n: int) -> float | None:
    """redis-benchmark's XADD, pipelined 500 deep: the server's own ceiling."""
    try:
        done = subprocess.run(
            [
                "redis-benchmark",
                "-p",
                str(port),
                "-n",
                str(n),
                "-P",
                "500",
                "-q",
                "XADD",
                "bench:rb",
                "*",
                "type",
                "noop",
                "payload",
                '{"n":1}',
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in done.stdout.replace("\r", "\n").splitlines():
        if "requests per second" in line:
            # "XADD bench:rb * ...: 123456.79 requests per second, p50=..."
            return float(line.rsplit(": ", 1)[1].split("requests")[0].strip())
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small N, 1 round, fewer peers: under 2 minutes"
    )
    parser.add_argument("--peers", default=None, help="comma-separated system keys (default: all)")
    parser.add_argument("--n", type=int, default=None, help="tasks per drain/enqueue run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="seconds one drain run may take")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    quick = args.quick
    n = args.n or (2000 if quick else 10000)
    count = args.rounds or (1 if quick else 3)
    args.limit = args.limit or (20.0 if quick else 40.0)
    latency_n = 100 if quick else 1000
    idle_seconds = 3.0 if quick else 10.0
    wanted = args.peers.split(",") if args.peers else (QUICK if quick else None)
    systems = [
        s for s in SYSTEMS if wanted is None or s.key.split(" ")[0] in wanted or s.key in wanted
    ]

    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with RedisServer() as server:
        bench = Bench(server, args)
        redis_version = bench.redis.info()["redis_version"]
        ceiling_rb = redis_benchmark(server.port, max(n, 100_000))

        def raw_enqueue() -> float:
            bench.redis.flushall()
            return n / raw.raw_enqueue(bench.url, n)

        def raw_drain() -> float:
            bench.redis.flushall()
            raw.raw_enqueue(bench.url, n)
            return n / raw.raw_drain(bench.url, n)

        raw_row = {
            "system": "raw redis-py + hiredis loop",
            "version": f"redis-py {redis.__version__}",
            "settings": "XADD ×500 pipelined; XREADGROUP COUNT 500 + pipelined XACK/XDEL; 1 process",
            "enqueue_bulk": rounds(count, raw_enqueue),
            "drain_1": rounds(count, raw_drain),
        }
        rows.append(raw_row)
        for system in systems:
            row: dict[str, Any] = {"system": system.key}
            reason = system.missing()
            if reason:
                row["missing"] = reason
                rows.append(row)
                print(f"{system.key}: {reason}", flush=True)
                continue
            info = bench.driver(system, "info")
            row["version"] = info["version"]
            row["settings"] = info["settings"]
            size = n * 5 if system.key == "flumeq" else n
            row["n"] = size
            try:
                single = min(size, n)
                row["enqueue_single"] = rounds(
                    count, lambda s=system, k=single: bench.enqueue(s, k, False)
                )
                if info["bulk"]:
                    row["enqueue_bulk"] = rounds(
                        count, lambda s=system, k=size: bench.enqueue(s, k, True)
                    )
                for procs in (1, 2):
                    measured = [bench.drain(system, size, procs, "noop") for _ in range(count)]
                    row[f"drain_{procs}"] = Figure(
                        [m[0] for m in measured if m[0] == m[0]],
                        note=next((m[2] for m in measured if m[2]), ""),
                    )
                    if procs == 2:
                        row["startup"] = Figure([m[1] for m in measured if m[1] == m[1]])
                for kind, tasks in (("cpu", max(200, n // 10)), ("io", max(200, n // 10))):
                    measured = [bench.drain(system, tasks, 2, kind) for _ in range(count)]
                    row[kind] = Figure(
                        [m[0] for m in measured if m[0] == m[0]],
                        note=next((m[2] for m in measured if m[2]), ""),
                    )
                latencies, note = bench.latency(system, latency_n)
                row["latency"] = (latencies, note)
                row["idle"] = bench.idle(system, idle_seconds)
            except Exception as error:  # a broken peer must not hide the others
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            print(f"{system.key}: done ({time.monotonic() - started:.0f}s)", flush=True)

    report = render(rows, args, n, count, redis_version, ceiling_rb, latency_n, idle_seconds, quick)
    print(report)
    if not quick or args.output != str(HERE / "RESULTS.md"):
        Path(args.output).write_text(report)
        print(f"written to {args.output}")


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


def render(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    n: int,
    count: int,
    redis_version: str,
    ceiling_rb: float | None,
    latency_n: int,
    idle_seconds: float,
    quick: bool,
) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=HERE,
    ).stdout.strip()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?"
    )
    command = "python benches/run.py " + " ".join(sys.argv[1:])
    lines = [
        "# Bench results",
        "",
        f"`{command.strip()}` — {dt.date.today()} — commit {commit}",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"Python {platform.python_version()}; redis-server {redis_version}. "
        f"Median of {count} run(s), min–max in brackets. Numbers compare only within this run.",
        "",
        f"Drain and enqueue runs use N = {n} tasks (flumeq: 5 N, its runs are short); CPU- and "
        f"I/O-bound runs use N/10 with 2 worker processes; latency: {latency_n} tasks enqueued one "
        f"at a time at 200/s; idle: 2 worker processes watched for {idle_seconds:.0f} s after a warm-up.",
        "",
    ]
    if ceiling_rb:
        lines += [
            f"redis-benchmark XADD pipelined ×500 (server ceiling): {ceiling_rb:,.0f} requests/s.",
            "",
        ]
    lines += [
        "| system | version | enqueue/s (one call each) | enqueue/s (bulk) | drain/s, 1 process | drain/s, 2 processes "
        "| start-up s | CPU-bound/s | I/O-bound/s | latency p50 / p99 / max ms | RSS MB per process | idle CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "missing" in row or "error" in row:
            lines.append(
                f"| {row['system']} | {row.get('version', '–')} | {row.get('missing') or row.get('error')} |"
                + " |" * 9
            )
            continue
        latency = row.get("latency")
        if latency and latency[0]:
            values = latency[0]
            latency_text = (
                f"{percentile(values, 0.5):.2f} / {percentile(values, 0.99):.2f} / {values[-1]:.1f}"
            )
            if latency[1]:
                latency_text += f" ({latency[1]})"
        else:
            latency_text = latency[1] if latency else "–"
        idle = row.get("idle")
        cells = [
            row["system"],
            row.get("version", "–"),
            row["enqueue_single"].show() if "enqueue_single" in row else "–",
            row["enqueue_bulk"].show() if "enqueue_bulk" in row else "–",
            row["drain_1"].show() if "drain_1" in row else "–",
            row["drain_2"].show() if "drain_2" in row else "–",
            row["startup"].show(digits=2) if "startup" in row else "–",
            row["cpu"].show() if "cpu" in row else "–",
            row["io"].show() if "io" in row else "–",
            latency_text,
            f"{idle[1]:.0f} ({idle[2]} proc)" if idle else "–",
            f"{idle[0]:.2f}" if idle else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Settings per system:", ""]
    for row in rows:
        if row.get("settings"):
            lines.append(f"- **{row['system']}**: {row['settings']}")
    lines += ["", *targets(rows)]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    by_name = {row["system"]: row for row in rows}
    flumeq = by_name.get("flumeq")
    if not flumeq or "drain_2" not in flumeq:
        return []
    peers = [
        row["drain_2"].median
        for name, row in by_name.items()
        if name not in ("flumeq", "raw redis-py + hiredis loop")
        and "drain_2" in row
        and row["drain_2"].values
    ]
    best_peer = max(peers) if peers else float("nan")
    drain = flumeq["drain_2"].median
    bulk = flumeq.get("enqueue_bulk", Figure([])).median
    raw_row = by_name["raw redis-py + hiredis loop"]
    latency = flumeq.get("latency", ([], ""))[0]
    idle = flumeq.get("idle")

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = ["Targets (flumeq):", "", "| target | measured | |", "|---|---|---|"]
    lines.append(
        f"| drain, 2 processes >= 100k tasks/s | {drain:,.0f}/s | {mark(drain >= 100_000)} |"
    )
    if peers:
        lines.append(
            f"| drain >= 20x the fastest peer | {drain / best_peer:.1f}x ({best_peer:,.0f}/s) | {mark(drain >= 20 * best_peer)} |"
        )
    lines.append(f"| enqueue_many >= 200k tasks/s | {bulk:,.0f}/s | {mark(bulk >= 200_000)} |")
    lines.append(
        f"| enqueue_many >= raw pipelined loop | {bulk / raw_row['enqueue_bulk'].median:.2f}x | {mark(bulk >= raw_row['enqueue_bulk'].median)} |"
    )
    if latency:
        p50, p99 = percentile(latency, 0.5), percentile(latency, 0.99)
        lines.append(
            f"| latency p50 < 1 ms, p99 < 5 ms | {p50:.2f} / {p99:.2f} ms | {mark(p50 < 1 and p99 < 5)} |"
        )
    if idle:
        lines.append(f"| idle CPU ~0 | {idle[0]:.2f} % | {mark(idle[0] < 1)} |")
        lines.append(f"| RSS per actor <= 35 MB | {idle[1]:.0f} MB | {mark(idle[1] <= 35)} |")
    return lines


if __name__ == "__main__":
    main()
