"""``App`` and ``@app.task`` end to end: payloads by name, options, plain
calls, ``current_task()``, sync and async tasks in one engine, the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import orjson
import pytest
import redis

import flumeq
from conftest import ROOT, script_env

STREAM = "flumeq:{default}:stream"


def make_app(url: str) -> tuple[flumeq.App, Any, Any, Any]:
    app = flumeq.App(url, result_ttl=60)

    @app.task
    def add(a: int, b: int = 0) -> int:
        return a + b

    @app.task(name="whoami", queue="emails", max_retry=2)
    async def whoami(greeting: str, *, loud: bool = False) -> dict[str, Any]:
        task = flumeq.current_task()
        assert task is not None
        await asyncio.sleep(0)
        text = f"{greeting} {task.type} #{task.attempt}"
        return {"text": text.upper() if loud else text, "id": task.id, "queue": task.queue}

    @app.task
    def spread(first: int, /, *rest: int, **named: int) -> int:
        return first + sum(rest) + sum(named.values())

    @app.task
    def me() -> Optional[str]:
        task = flumeq.current_task()
        return task.id if task else None

    return app, add, whoami, spread


def test_payloads_are_arguments_by_name_and_plain_calls_run_here(
    redis_url: str, r: redis.Redis
) -> None:
    _, add, whoami, _ = make_app(redis_url)
    assert add(1, 2) == 3
    coroutine = whoami("hi")
    assert asyncio.iscoroutine(coroutine)
    coroutine.close()
    info = add.enqueue(1, b=2)
    assert add.name == f"{__name__}.make_app.<locals>.add"
    ((_, fields),) = r.xrange(STREAM)
    assert fields[b"type"] == add.name.encode()
    assert orjson.loads(fields[b"payload"]) == {"a": 1, "b": 2}
    assert fields[b"result_ttl"] == b"60"
    assert info.queue == "default" and info.result_ttl == 60
    later = add.options(delay=60, task_id="add-1", labels={"x": "y"}, result_ttl=5).enqueue(4)
    assert later.id == "add-1" and later.entry_id is None and later.result_ttl == 5
    assert r.zcard("flumeq:{default}:delayed") == 1
    other = whoami.options(queue="q").enqueue("yo")
    assert other.queue == "q"


def test_bad_arguments_fail_before_anything_is_written(redis_url: str, r: redis.Redis) -> None:
    app, add, _, _ = make_app(redis_url)
    with pytest.raises(TypeError, match=r"add'.*missing a required argument: 'a'"):
        add.enqueue()
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        add.enqueue(1, c=3)  # type: ignore[call-arg]
    with pytest.raises(flumeq.InvalidTask, match="payload is not JSON-serialisable"):
        add.enqueue(object())  # type: ignore[arg-type]
    with pytest.raises(flumeq.InvalidTask, match="apply to one call"):
        app.task(delay=5)
    with pytest.raises(flumeq.ConfigError, match="two tasks are named 'add'"):
        app.task(name="add")(lambda: 1)
        app.task(name="add")(lambda: 2)
    assert r.keys() == []


def test_an_engine_serves_an_app_with_sync_and_async_tasks(redis_url: str) -> None:
    app, add, whoami, spread = make_app(redis_url)
    sums = [add.enqueue(n, b=1) for n in range(50)]
    hello = whoami.enqueue("hello", loud=True)
    spread_info = spread.enqueue(1, 2, 3, x=4)
    me = app.tasks[f"{__name__}.make_app.<locals>.me"].enqueue()
    assert app.queues() == ("default", "emails")
    report = flumeq.Engine(app).run(processes=2, burst=True)
    assert report["processed"] == 53, report
    assert [info.result(timeout=5) for info in sums] == [n + 1 for n in range(50)]
    assert hello.result(timeout=5) == {
        "text": "HELLO WHOAMI #0",
        "id": hello.id,
        "queue": "emails",
    }
    assert spread_info.result(timeout=5) == 10
    assert me.result(timeout=5) == me.id
    assert flumeq.current_task() is None


def test_async_enqueue_and_result_through_the_app(redis_url: str) -> None:
    app, add, _, _ = make_app(redis_url)

    async def produce() -> list[Any]:
        return list(await asyncio.gather(*(add.aenqueue(n, n) for n in range(100))))

    infos = asyncio.run(produce())
    flumeq.Engine(app).run(processes=1, burst=True)

    async def wait() -> list[int]:
        return list(await asyncio.gather(*(app.aclient.result(info, timeout=5) for info in infos)))

    assert asyncio.run(wait()) == [2 * n for n in range(100)]


def test_flumeq_worker_serves_an_app(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "tasksapp.py").write_text(
        textwrap.dedent(
            """
            import flumeq
            app = flumeq.App(result_ttl=60)

            @app.task
            def double(n: int) -> int:
                return 2 * n
            """
        )
    )
    info = flumeq.Client(redis_url).enqueue("tasksapp.double", {"n": 21}, result_ttl=60)
    done = subprocess.run(
        [sys.executable, "-m", "flumeq", "worker", "tasksapp", "-p", "1", "--burst"],
        cwd=tmp_path,
        env=script_env({"FLUMEQ_URL": redis_url, "PYTHONPATH": str(ROOT / "tests")}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert info.result(timeout=5) == 42
