"""Task history: what recording costs the drain, how fast the history
process writes, what PostgreSQL down costs, and how fast searches are.

    python benches/history.py [--tasks 100000] [--processes 2] [--rounds 3]
                              [--search-rows 1000000] [--skip-search]

It starts its own redis-server and a throwaway PostgreSQL cluster (initdb,
as the tests do: `tests/postgres.py`), then prints three tables:

1. drains of no-op tasks, interleaved round by round: history off, history
   on (PostgreSQL up), history on with PostgreSQL stopped. The drain is
   timed from the engine's start to the last task counted processed (a
   thread polls the stats hash every 2 ms). "on" then waits until every
   task's row is in PostgreSQL and reports the history writer's events/s
   (from the engine's start to the last row). With PostgreSQL stopped, it then starts
   it and times how long one history process takes to write what waited.
2. search latency over `--search-rows` task rows (made in SQL with a
   realistic mix of queues, types, states, labels and payloads), p50 and
   p99 of 50 searches per filter with varied values.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psycopg
import redis

import flumeq
from flumeq.history.sink import Sink
from flumeq.redis_server import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from postgres import PostgresServer


def noop(task: flumeq.Task) -> None:
    pass


def count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute(sql).fetchone()
        return int(row[0]) if row else 0


def watch(url: str, tasks: int, drained: list[float]) -> None:
    """Notes when the queue's processed counter reaches ``tasks``."""
    conn = redis.Redis.from_url(url)
    while int(conn.hget("flumeq:{default}:stats", "processed") or 0) < tasks:
        time.sleep(0.002)
    drained.append(time.perf_counter())


def reset(url: str, dsn: str) -> None:
    redis.Redis.from_url(url).flushall()
    with psycopg.connect(dsn, autocommit=True) as connection:
        exists = connection.execute("SELECT to_regclass('flumeq_task')").fetchone()
        if exists and exists[0]:
            connection.execute("TRUNCATE flumeq_task, flumeq_task_event")


def drain(
    url: str, dsn: str, tasks: int, processes: int, mode: str, pg: PostgresServer
) -> dict[str, float]:
    reset(url, dsn)
    client = flumeq.Client(url)
    for start in range(0, tasks, 10_000):
        client.enqueue_many([("noop", n) for n in range(start, min(tasks, start + 10_000))])
    if mode == "down":
        pg.stop()
    history = None if mode == "off" else dsn
    engine = flumeq.Engine({"noop": noop}, url, history=history, consumer="bench")
    drained: list[float] = []
    watcher = threading.Thread(target=watch, args=(url, tasks, drained), daemon=True)
    started = time.perf_counter()
    watcher.start()
    report = engine.run(processes=processes, burst=True)
    watcher.join()
    assert report["processed"] == tasks, report
    # The drain ends when the last outcome is written (a burst engine then
    # still stops: its history process writes for up to 3 s more).
    result = {"rate": tasks / (drained[0] - started)}
    if mode == "on":
        left = count(dsn, "SELECT count(*) FROM flumeq_task")
        if left < tasks:  # the burst's history process had 3 s to finish: finish here
            sink = Sink(url, dsn, ["default"], consumer="bench")
            while sink.step():
                pass
        written = time.perf_counter() - started
        result["rows"] = count(dsn, "SELECT count(*) FROM flumeq_task")
        result["events"] = count(dsn, "SELECT count(*) FROM flumeq_task_event")
        result["writer"] = result["events"] / written
    if mode == "down":
        pg.start()
        begun = time.perf_counter()
        sink = Sink(url, dsn, ["default"], consumer="bench")
        while sink.step():
            pass
        result["catch_up"] = time.perf_counter() - begun
        result["rows"] = count(dsn, "SELECT count(*) FROM flumeq_task")
        result["events"] = count(dsn, "SELECT count(*) FROM flumeq_task_event")
    return result


FILL = """
INSERT INTO flumeq_task (queue, task_id, type, state, attempts, max_retry, payload, labels,
                         result, error, worker, enqueued_at, started_at, finished_at,
                         duration_ms, updated_at)
SELECT 'q' || (n %% 5),
       md5(n::text),
       'type:' || (n %% 20),
       (ARRAY['succeeded','succeeded','succeeded','succeeded','succeeded','succeeded',
              'succeeded','dead','retried','cancelled'])[1 + n %% 10],
       1 + n %% 3, 3,
       '{"order":' || n || ',"to":"user' || (n %% 50000) || '@example.com"}',
       jsonb_build_object('tenant', 't' || (n %% 100)),
       CASE WHEN n %% 10 < 7 THEN '{"ok":true}' END,
       CASE WHEN n %% 10 = 7 THEN 'ValueError: order ' || n || ' could not be charged' END,
       'pod-' || (n %% 8),
       now() - make_interval(secs => (%(rows)s - n) * 0.6),
       now() - make_interval(secs => (%(rows)s - n) * 0.6),
       now() - make_interval(secs => (%(rows)s - n) * 0.6),
       n %% 900,
       now() - make_interval(secs => (%(rows)s - n) * 0.6)
FROM generate_series(1, %(rows)s) AS n
"""


def search_latency(dsn: str, rows: int) -> list[tuple[str, float, float, int]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE flumeq_task, flumeq_task_event")
        started = time.perf_counter()
        connection.execute(FILL, {"rows": rows})
        connection.execute("VACUUM ANALYZE flumeq_task")
        print(f"\n{rows:,} history rows made in {time.perf_counter() - started:.1f}s")
    history = flumeq.History(dsn)
    pick = random.Random(7)
    cases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("newest (no filter)", lambda: {}),
        ("queue=", lambda: {"queue": f"q{pick.randrange(5)}"}),
        ("type=", lambda: {"type": f"type:{pick.randrange(20)}"}),
        ("state=dead", lambda: {"state": "dead"}),
        ("label=tenant=tN", lambda: {"label": f"tenant=t{pick.randrange(100)}"}),
        ("since=1h", lambda: {"since": "1h"}),
        ("since+until (a 1 h window, 3 days back)", lambda: {"since": "75h", "until": "74h"}),
        ("text= (an order number)", lambda: {"text": f'order":{pick.randrange(rows)},'}),
        ("text= (an error word)", lambda: {"text": "could not be charged"}),
        ("queue= type= state=", lambda: {"queue": "q1", "type": "type:1", "state": "succeeded"}),
        ("task(id)", lambda: {"_task": f"{pick.randrange(1, rows)}"}),
    ]
    results = []
    for name, make in cases:
        timings = []
        found = 0
        for _ in range(50):
            filters = make()
            begun = time.perf_counter()
            if "_task" in filters:
                task = history.task(hashlib.md5(filters["_task"].encode()).hexdigest())
                found = int(task is not None)
            else:
                found = len(history.search(limit=50, **filters))
            timings.append((time.perf_counter() - begun) * 1000)
        timings.sort()
        results.append(
            (name, statistics.median(timings), timings[int(len(timings) * 0.99) - 1], found)
        )
    history.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--search-rows", type=int, default=1_000_000)
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    with RedisServer() as server, PostgresServer() as pg:
        # Make the schema once, outside the timed runs.
        flumeq.History(pg.dsn).search(limit=1)
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": [], "down": []}
        for round_ in range(args.rounds):
            for mode in ("off", "on", "down"):
                result = drain(server.url, pg.dsn, args.tasks, args.processes, mode, pg)
                runs[mode].append(result)
                print(f"round {round_ + 1} {mode}: {result}", file=sys.stderr)
        off = statistics.median(r["rate"] for r in runs["off"])
        print(f"\n{args.tasks:,} no-op tasks, {args.processes} processes, median of {args.rounds}")
        print(
            "| drain | tasks/s | vs history off | task rows | event rows | history writer events/s | catch-up after PostgreSQL is back |"
        )
        print("|---|---|---|---|---|---|---|")
        labels = {
            "off": "history off",
            "on": "history on",
            "down": "history on, PostgreSQL stopped",
        }
        for mode, results in runs.items():
            rate = statistics.median(r["rate"] for r in results)
            rows = min(int(r.get("rows", 0)) for r in results) if mode != "off" else "–"
            events = min(int(r.get("events", 0)) for r in results) if mode != "off" else "–"
            writer = (
                f"{statistics.median(r['writer'] for r in results):,.0f}" if mode == "on" else "–"
            )
            catch = (
                f"{statistics.median(r['catch_up'] for r in results):.2f} s"
                if mode == "down"
                else "–"
            )
            rows_text = f"{rows:,}" if isinstance(rows, int) else rows
            events_text = f"{events:,}" if isinstance(events, int) else events
            print(
                f"| {labels[mode]} | {rate:,.0f} | {rate / off:.0%} | {rows_text} | {events_text} | {writer} | {catch} |"
            )
        if not args.skip_search:
            results = search_latency(pg.dsn, args.search_rows)
            print(f"\nsearch over {args.search_rows:,} task rows (limit 50), 50 searches each")
            print("| filter | p50 ms | p99 ms | rows found (last) |")
            print("|---|---|---|---|")
            for name, p50, p99, found in results:
                print(f"| {name} | {p50:.2f} | {p99:.2f} | {found} |")


if __name__ == "__main__":
    main()
