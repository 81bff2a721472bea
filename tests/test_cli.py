"""The ``flumeq`` command line against a real Redis: click's runner for the
short commands, real subprocesses for ``worker`` (signals, registry, metrics,
logs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

import flumeq
from conftest import wait_until
from flumeq.admin import Admin
from flumeq.cli import _engine_for, load_app, main

APP = """
import os
import time
import flumeq

def ok(task):
    if task.payload and task.payload.get("mark"):
        open(task.payload["mark"], "w").close()
    if task.payload and task.payload.get("sleep"):
        time.sleep(task.payload["sleep"])

def bad(task):
    raise ValueError("bad input " + str(task.payload))

handlers = {"ok": ok, "bad": bad}
engine = flumeq.Engine(handlers, queues={"critical": 2, "default": 1}, retry_base=0)
"""


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "myapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args: str, url: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "--url", url], input=input)
    return result.exit_code, result.output


def worker(url: str, cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flumeq", "worker", *args, "--url", url],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_enqueue_prints_the_id_and_honours_the_options(redis_url: str) -> None:
    code, out = run(
        "enqueue", "ok", '{"a": 1}', "--queue", "critical", "--max-retry", "2", url=redis_url
    )
    assert code == 0, out
    task_id = out.strip()
    assert len(task_id) == 32
    (hit,) = Admin(redis_url).find_task(task_id)
    assert hit["queue"] == "critical"
    assert hit["state"] == "ready"
    assert hit["payload"] == '{"a":1}'
    assert hit["max_retry"] == 2

    code, out = run("enqueue", "ok", "--delay", "60", "--task-id", "order-7", url=redis_url)
    assert (code, out.strip()) == (0, "order-7")
    assert flumeq.Client(redis_url).stats()["delayed"] == 1

    assert run("enqueue", "ok", "--unique-key", "u1", url=redis_url)[0] == 0
    code, out = run("enqueue", "ok", "--unique-key", "u1", url=redis_url)
    assert code == 1
    assert 'unique_key "u1" is held' in out

    code, out = run("enqueue", "ok", "{not json", url=redis_url)
    assert code == 2
    assert "not valid JSON" in out


def test_unreachable_redis_is_reported_without_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    for args in (["enqueue", "ok"], ["stats", "--interval", "0"], ["dead", "list", "q"]):
        code, out = run(*args, url=url)
        assert code == 1, out
        assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in out
        assert "hunter2" not in out


def test_stats_and_unknown_queues(redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("ok", {}) for _ in range(3)], queue="critical")
    code, out = run("stats", "--interval", "0", url=redis_url)
    assert code == 0, out
    header, _, row = out.splitlines()[:3]
    assert header.split()[:3] == ["queue", "ready", "in"]
    assert row.split()[:3] == ["critical", "3", "0"]
    assert "no live workers" in out

    code, out = run("stats", "--queue", "nope", url=redis_url)
    assert code == 1
    assert "unknown queue 'nope' (known queues: critical)" in out


def test_bad_module_paths_exit_2_with_the_reason(redis_url: str, app_dir: Path) -> None:
    code, out = run("worker", "nosuchmodule:handlers", url=redis_url)
    assert code == 2
    assert "cannot import module 'nosuchmodule'" in out
    (app_dir / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    code, out = run("worker", "broken:handlers", url=redis_url)
    assert code == 2
    assert "cannot import module 'broken': RuntimeError: boom at import" in out
    code, out = run("worker", "myapp:missing", url=redis_url)
    assert code == 2
    assert "module 'myapp' has no 'missing'" in out
    code, out = run("worker", "myapp:ok", url=redis_url)
    assert code == 2
    assert "expected a flumeq.App, an Engine or a mapping" in out
    code, out = run("worker", "myapp", "-q", "a=x", url=redis_url)
    assert code == 2
    assert "weight of queue 'a' must be an integer" in out


def test_worker_takes_a_stable_consumer_name(redis_url: str, app_dir: Path, r: Any) -> None:
    flumeq.Client(redis_url).enqueue("ok", {})
    proc = worker(redis_url, app_dir, "myapp", "-p", "1", "--burst", "--consumer", "pod-7")
    assert proc.wait(timeout=60) == 0, proc.stdout.read() if proc.stdout else ""
    names = [c["name"] for c in r.xinfo_consumers("flumeq:{default}:stream", "flumeq")]
    assert names == [b"pod-7"]


def test_dead_letter_commands(redis_url: str, app_dir: Path) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("bad", {"n": n}) for n in range(3)], max_retry=0)
    proc = worker(redis_url, app_dir, "myapp:handlers", "-p", "1", "--burst")
    assert proc.wait(timeout=60) == 0, proc.stdout.read() if proc.stdout else ""
    assert client.stats()["dead"] == 3

    code, out = run("dead", "list", "default", url=redis_url)
    assert code == 0, out
    assert out.count("ValueError: bad input") == 3

    code, out = run("dead", "show", "default", infos[0].id, url=redis_url)
    assert code == 0, out
    assert "Traceback (most recent call last)" in out
    assert f"task_id: {infos[0].id}" in out

    code, out = run("dead", "requeue", "default", infos[0].id, url=redis_url)
    assert (code, out.strip()) == (0, "requeued 1 task(s) to 'default'")
    assert client.stats()["ready"] == 1

    # Destructive actions ask first; "no" (or no terminal) aborts with exit 1.
    code, out = run("dead", "purge", "default", url=redis_url, input="n\n")
    assert code == 1
    assert "Delete all 2 dead letters of 'default'?" in out
    assert client.stats()["dead"] == 2
    code, out = run("dead", "requeue", "default", "--all", url=redis_url, input="y\n")
    assert code == 0
    assert "requeued 2 task(s)" in out
    code, out = run("dead", "purge", "default", "--yes", url=redis_url)
    assert (code, out.strip()) == (0, "purged 0 dead letter(s) of 'default'")

    code, out = run("dead", "list", "nope", url=redis_url)
    assert code == 1
    assert "unknown queue 'nope'" in out


def test_worker_registers_serves_metrics_logs_json_and_stops_on_sigterm(
    redis_url: str, app_dir: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    client = flumeq.Client(redis_url)
    client.enqueue_many([("ok", {}) for _ in range(50)], queue="critical")
    client.enqueue("bad", {"x": 1}, queue="default", max_retry=0)
    proc = worker(
        redis_url,
        app_dir,
        "myapp",
        "-p",
        "2",
        "-q",
        "critical=2,default=1",
        "--log-format",
        "json",
        "--metrics-port",
        str(metrics_port),
    )
    try:
        admin = Admin(redis_url)
        wait_until(lambda: admin.workers() and admin.workers()[0]["processed"] == 50, timeout=20)
        (registered,) = admin.workers()
        assert registered["queues"] == ["critical", "default"]
        assert registered["processes"] == 2
        assert registered["pid"] == proc.pid
        assert registered["host"] == socket.gethostname()

        _code, out = run("stats", "--interval", "0", url=redis_url)
        assert f"{socket.gethostname()}-{proc.pid}" in out

        def scrape() -> str:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=5
            ) as reply:
                return str(reply.read().decode())

        wait_until(
            lambda: 'flumeq_tasks_processed_total{queue="critical",type="ok"} 50.0' in scrape(),
            timeout=20,
        )
        text = scrape()
        assert 'flumeq_tasks_dead_total{queue="default",type="bad"} 1.0' in text
        assert 'flumeq_task_duration_seconds_count{queue="critical",type="ok"} 50.0' in text
        assert "flumeq_workers 1.0" in text
        assert 'flumeq_queue_ready{queue="critical"} 0.0' in text

        # A long task is running when SIGTERM comes: it finishes, then the worker exits 0.
        mark = app_dir / "long-task-started"
        client.enqueue("ok", {"sleep": 1.5, "mark": str(mark)}, queue="critical")
        wait_until(mark.exists, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read() if proc.stdout else ""
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    failure = next(line for line in lines if "failed: ValueError" in line["message"])
    assert failure["task_type"] == "bad"
    assert failure["queue"] == "default"
    assert failure["attempt"] == 0
    assert len(failure["task_id"]) == 32
    assert any("stopping gracefully" in line["message"] for line in lines)
    assert client.stats("critical")["processed"] == 51
    # A graceful stop removes the worker from the registry at once.
    assert Admin(redis_url).workers() == []


def test_a_killed_worker_drops_out_of_the_registry(
    redis_url: str, app_dir: Path, r: redis.Redis
) -> None:
    proc = worker(redis_url, app_dir, "myapp:handlers", "-p", "1")
    admin = Admin(redis_url)
    try:
        wait_until(lambda: len(admin.workers()) == 1, timeout=20)
        consumer = admin.workers()[0]["consumer"]
        # kill -9 the supervisor and its children: no goodbye is written.
        for child in subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split():
            os.kill(int(child), signal.SIGKILL)
        proc.kill()
        proc.wait()
        assert r.zscore("flumeq:workers", consumer) is not None
        # The entry expires after five missed beats (10 s).
        wait_until(lambda: admin.workers() == [], timeout=20)
        assert r.zscore("flumeq:workers", consumer) is None
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_takes_metrics_host(
    redis_url: str, app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = run("worker", "--help", url=redis_url)
    assert code == 0
    assert "--metrics-host" in out and "FLUMEQ_METRICS_HOST" in out
    command = main.commands["worker"]
    assert command.make_context("worker", ["myapp"]).params["metrics_host"] is None
    monkeypatch.setenv("FLUMEQ_METRICS_HOST", "::1")
    assert command.make_context("worker", ["myapp"]).params["metrics_host"] == "::1"
    # An Engine app gets the address given; a mapping of handlers gets loopback by default.
    engine = _engine_for(load_app("myapp"), "myapp", redis_url, "flumeq", None, None, 9808, "::1")
    assert (engine.metrics_port, getattr(engine, "metrics_host", None)) == (9808, "::1")
    handlers = load_app("myapp:handlers")
    engine = _engine_for(handlers, "myapp", redis_url, "flumeq", None, None, 9808, None)
    assert getattr(engine, "metrics_host", None) == "127.0.0.1"


def test_python_dash_m_flumeq_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flumeq", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("worker", "enqueue", "stats", "dead", "ui", "demo"):
        assert command in out


def test_ui_refuses_to_listen_off_localhost_without_a_token(redis_url: str) -> None:
    code, out = run("ui", "--host", "0.0.0.0", url=redis_url)
    assert code == 2
    assert "--token is required to serve on '0.0.0.0'" in out


def test_stats_watch_refreshes_until_ctrl_c_and_at_schedules(redis_url: str) -> None:
    code, out = run("enqueue", "ok", "--at", "2030-01-01T00:00:00", "--queue", "w", url=redis_url)
    assert code == 0, out
    assert flumeq.Client(redis_url).stats("w")["delayed"] == 1
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flumeq",
            "stats",
            "--watch",
            "--interval",
            "0.5",
            "--url",
            redis_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, output
    assert output.count("flumeq stats") >= 2  # refreshed at least once
    assert "w " in output


def test_importing_flumeq_leaves_the_web_and_metrics_stacks_unloaded() -> None:
    """Producers and actors import flumeq: they must not pay (memory, GC
    traversals) for prometheus-client, starlette or importlib.metadata."""
    heavy = (
        "prometheus_client",
        "starlette",
        "uvicorn",
        "jinja2",
        "importlib.metadata",
        "psycopg",
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, flumeq; print([m for m in {heavy!r} if m in sys.modules])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"
