"""One pass over every feature against one Redis URL, for the deployment
tests (TLS, ACL users, Sentinel, a unix socket, Cluster's key rules): an engine in its own process serves three
queues with retries, dead letters, a rate limit, a cron entry and metrics;
a producer enqueues plain, delayed, unique, idempotent, result-keeping,
cancelled and paused work; the CLI's ``stats`` and the dashboard's API read
it back. Handlers count their runs in a second, plain Redis (``counter``),
so the deployment under test holds only flumeq's own keys."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Optional

import redis

import flumeq
from conftest import ROOT, process_redis, script_env, spawn_script, wait_until
from flumeq.redis_server import free_port

QUEUES = ("default", "other", "held")


def handlers(counter: str) -> dict[str, Any]:
    """The scenario's handlers; each run is counted in ``counter``."""

    def count(task: flumeq.Task) -> None:
        process_redis(counter).hincrby("runs", task.id, 1)

    def flaky(task: flumeq.Task) -> None:
        process_redis(counter).hincrby("runs", task.id, 1)
        if task.attempt == 0:
            raise RuntimeError("first run fails")

    def doomed(task: flumeq.Task) -> None:
        process_redis(counter).hincrby("runs", task.id, 1)
        raise ValueError("never works")

    def add(task: flumeq.Task) -> int:
        process_redis(counter).hincrby("runs", task.id, 1)
        return int(task.payload["a"]) + int(task.payload["b"])

    def sleepy(task: flumeq.Task) -> None:
        process_redis(counter).hincrby("started", task.id, 1)
        time.sleep(30.0)
        process_redis(counter).hincrby("runs", task.id, 1)

    def tick(task: flumeq.Task) -> None:
        process_redis(counter).hincrby("ticks", task.id, 1)

    return {
        "count": count,
        "flaky": flaky,
        "doomed": doomed,
        "add": add,
        "tick": tick,
        "sleepy": sleepy,
    }


ENGINE = """
import sys
import flumeq
import flumeq.logs
from scenario import engine
flumeq.logs.configure("INFO")
engine(sys.argv[1], sys.argv[2], int(sys.argv[3])).run(processes=2)
"""


def engine(url: str, counter: str, metrics_port: int, **options: Any) -> flumeq.Engine:
    return flumeq.Engine(
        handlers(counter),
        url,
        queues=QUEUES,
        retry_base=0.2,
        retry_max=0.5,
        claim_stale_after=5.0,
        metrics_port=metrics_port,
        cron=[flumeq.Cron(1.0, "tick", name="beat")],
        rate_limits={"count": "500/s"},
        concurrency_limits={"add": 2},
        **options,
    )


def start_engine(
    url: str, counter: str, env: Optional[dict[str, str]] = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    return spawn_script(ENGINE, url, counter, str(port), env=env), port


def stop_engine(process: subprocess.Popen[bytes], timeout: float = 40.0) -> str:
    """SIGTERM to the engine's process group; returns its stderr."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()
        raise AssertionError(f"the engine did not stop in time:\n{err.decode()[-3000:]}") from None
    return err.decode(errors="replace")


def runs(counter: str, key: str = "runs") -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.Redis.from_url(counter).hgetall(key).items()}


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def run_features(
    url: str,
    counter: str,
    env: Optional[dict[str, str]] = None,
    *,
    engine_url: Optional[str] = None,
    reader_url: Optional[str] = None,
) -> None:
    """Every feature once against ``url``; asserts what each one promises.
    The engine connects with ``engine_url``, and what only reads (stats,
    dead letters, the CLI, the dashboard) with ``reader_url``, both ``url``
    by default (the ACL test gives each role its own user)."""
    redis.Redis.from_url(counter).flushall()
    client = flumeq.Client(url)
    reader = flumeq.Client(reader_url or url)
    plain = client.enqueue_many([("count", {"n": n}) for n in range(200)])
    other = client.enqueue_many([("count", {"n": n}) for n in range(50)], queue="other")
    delayed = client.enqueue("count", {"late": True}, delay=1.0)
    flaky = client.enqueue("flaky", max_retry=3)
    doomed = client.enqueue("doomed", max_retry=0)
    first = client.enqueue("count", unique_key="only-one")
    with pytest_raises(flumeq.DuplicateTask):
        client.enqueue("count", unique_key="only-one")
    same_a = client.enqueue("count", task_id="business-42")
    sums = [client.enqueue("add", {"a": n, "b": 1}, result_ttl=60) for n in range(4)]
    cancelled = client.enqueue("count", delay=30.0, result_ttl=60)
    assert client.cancel(cancelled) is True
    assert client.pause("held") is True
    held = client.enqueue("count", queue="held")

    process, metrics_port = start_engine(engine_url or url, counter, env)
    try:
        running = client.enqueue("sleepy", queue="other", result_ttl=60)
        wait_until(lambda: running.id in runs(counter, "started"), timeout=30)
        assert client.cancel(running) is True
        with pytest_raises(flumeq.TaskCancelled):
            client.result(running, timeout=10)
        assert [client.result(info, timeout=30) for info in sums] == [1, 2, 3, 4]
        assert asyncio.run(async_sum(url)) == 42
        with_runs = [*plain, *other, delayed, flaky, first, same_a]
        wait_until(lambda: all(runs(counter).get(info.id) for info in with_runs), timeout=30)
        wait_until(lambda: len(reader.dead_letters()) == 1, timeout=20)
        # A later delivery of a done task id is acked without running (two
        # copies in flight at once may both run: the marker is written at
        # success).
        same_b = client.enqueue("count", task_id="business-42")
        wait_until(lambda: bool(runs(counter, "ticks")), timeout=20)
        time.sleep(1.0)
        assert held.id not in runs(counter), "a paused queue ran a task"
        assert client.resume("held") is True
        wait_until(lambda: held.id in runs(counter), timeout=20)
        idle = ("ready", "in_flight")
        wait_until(lambda: all(reader.stats()[k] == 0 for k in idle), timeout=20)

        seen = runs(counter)
        assert all(seen[info.id] == 1 for info in [*plain, *other, delayed, first])
        assert seen[flaky.id] == 2 and seen[doomed.id] == 1
        assert same_b.id == same_a.id and seen[same_a.id] == 1, "a done task id ran again"
        assert cancelled.id not in seen and running.id not in seen
        with pytest_raises(flumeq.TaskCancelled):
            client.result(cancelled, timeout=5)
        (dead,) = reader.dead_letters()
        assert dead["id"] == doomed.id and "never works" in dead["error"]

        stats = reader.stats()
        assert stats["dead"] == 1 and stats["processed"] >= 205
        cli = subprocess.run(
            [sys.executable, "-m", "flumeq", "stats", "--url", reader_url or url],
            check=False,
            cwd=ROOT,
            env=script_env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert "default" in cli.stdout and "other" in cli.stdout
        metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
        assert "flumeq_redis_up 1.0" in metrics, metrics
        assert "flumeq_tasks_processed_total" in metrics, metrics
        check_dashboard(reader_url or url, env)
    finally:
        err = stop_engine(process)
    assert "Traceback" not in err.replace("RuntimeError: first run fails", ""), err[-3000:]


async def async_sum(url: str) -> Any:
    """An enqueue and a wait through ``AsyncClient`` on ``url``."""
    async with flumeq.AsyncClient(url) as client:
        info = await client.enqueue("add", {"a": 40, "b": 2}, result_ttl=60)
        return await client.result(info, timeout=30)


def pytest_raises(kind: type[BaseException]) -> Any:
    import pytest  # noqa: PLC0415 (test-only helper)

    return pytest.raises(kind)


def check_dashboard(url: str, env: Optional[dict[str, str]]) -> None:
    """``flumeq ui`` on ``url`` serves its overview with the queues in it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "flumeq", "ui", "--url", url, "--port", str(port)],
        cwd=ROOT,
        env=script_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                overview = json.loads(http_get(f"http://127.0.0.1:{port}/api/overview"))
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    _, err = process.communicate()
                    raise AssertionError(f"the dashboard did not start: {err.decode()}") from None
                time.sleep(0.1)
        assert "default" in json.dumps(overview)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
