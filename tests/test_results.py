"""Results and waiting: kept outcomes, the ended stream, and their errors,
against a real Redis and a real engine."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import pytest
import redis

import flumeq
from conftest import spawn_script

RESULT = "flumeq:{default}:result:"
ENDED = "flumeq:{default}:ended"


def handlers() -> dict[str, Any]:
    async def later(task: flumeq.Task) -> Any:
        await asyncio.sleep(0.01)
        return {"later": task.payload["n"]}

    def fails(task: flumeq.Task) -> None:
        raise ValueError(f"no good: {task.payload}")

    return {
        "add": lambda task: task.payload["a"] + task.payload["b"],
        "none": lambda task: None,
        "later": later,
        "fails": fails,
        "set": lambda task: {1, 2},
        "huge": lambda task: "x" * (flumeq.MAX_RESULT_BYTES + 1),
    }


def test_values_are_kept_for_result_ttl_and_found_after_the_task_ended(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    add = client.enqueue("add", {"a": 2, "b": 3}, result_ttl=60)
    nothing = client.enqueue("none", {}, result_ttl=60)
    many = client.enqueue_many([("later", {"n": n}) for n in range(20)], result_ttl=30)
    plain = client.enqueue("add", {"a": 1, "b": 1})
    flumeq.Engine(handlers(), redis_url).run(processes=2, burst=True)
    # The tasks ended before the waits began.
    assert add.result(timeout=5) == 5
    assert nothing.result(timeout=5) is None
    assert [info.result(timeout=5) for info in many] == [{"later": n} for n in range(20)]
    assert client.result(add.id, timeout=5) == 5
    record = r.hgetall(RESULT + add.id)
    assert record[b"state"] == b"succeeded" and record[b"attempts"] == b"1"
    assert 0 < r.pttl(RESULT + add.id) <= 60_000
    assert r.xlen(ENDED) == 22
    # Without result_ttl nothing is kept, and info.result says why at once.
    assert not r.exists(RESULT + plain.id)
    with pytest.raises(flumeq.FlumeqError, match="without result_ttl"):
        plain.result(timeout=1)


def test_waiters_block_until_a_running_engine_ends_their_tasks(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    infos = [client.enqueue("add", {"a": n, "b": 1}, result_ttl=60) for n in range(8)]
    got: dict[int, Any] = {}

    def wait(n: int) -> None:
        got[n] = infos[n].result(timeout=30)

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    # Eight waiting threads, one blocking read in Redis.
    assert [c["cmd"] for c in r.client_list()].count("xread") == 1
    engine = spawn_script(
        """
        import sys, flumeq
        flumeq.Engine({"add": lambda t: t.payload["a"] + t.payload["b"]}, sys.argv[1]).run(processes=1)
        """,
        redis_url,
    )
    try:
        for thread in threads:
            thread.join(timeout=30)
        assert got == {n: n + 1 for n in range(8)}
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=30)


def test_final_failures_raise_task_failed_after_the_retries(redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    failing = client.enqueue("fails", {"n": 1}, max_retry=1, result_ttl=60)
    not_json = client.enqueue("set", {}, result_ttl=60)
    huge = client.enqueue("huge", {}, result_ttl=60)
    engine = flumeq.Engine(handlers(), redis_url, retry_base=0.01, retry_max=0.01)
    engine.run(processes=1, burst=True)
    with pytest.raises(flumeq.TaskFailed) as failed:
        failing.result(timeout=5)
    assert failed.value.reason == "error"
    assert failed.value.error == "ValueError: no good: {'n': 1}"
    assert "raise ValueError" in failed.value.traceback
    assert failed.value.attempts == 2
    with pytest.raises(flumeq.TaskFailed) as bad:
        not_json.result(timeout=5)
    assert bad.value.reason == "bad_result"
    assert "return value of type set is not JSON-serialisable" in bad.value.error
    with pytest.raises(flumeq.TaskFailed, match="more than MAX_RESULT_BYTES") as big:
        huge.result(timeout=5)
    assert big.value.reason == "bad_result"
    # A bad result is not retried: the handler's work was done.
    assert sorted(d["reason"] for d in client.dead_letters()) == ["bad_result"] * 2 + ["error"]


def test_waits_time_out_and_bad_waits_are_refused_without_writing(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("add", {"a": 1, "b": 2}, result_ttl=60)
    keys = sorted(r.keys())
    started = time.monotonic()
    with pytest.raises(flumeq.ResultTimeout) as timed_out:
        info.result(timeout=0.3)
    assert isinstance(timed_out.value, TimeoutError)
    assert 0.3 <= time.monotonic() - started < 2
    with pytest.raises(flumeq.InvalidTask, match="non-empty string"):
        client.result("", timeout=1)
    with pytest.raises(flumeq.InvalidTask, match="must not be negative"):
        client.result(info.id, timeout=-1)
    with pytest.raises(flumeq.InvalidTask, match="queue 'nope' is unknown"):
        client.result(info.id, queue="nope", timeout=1)
    with pytest.raises(flumeq.InvalidTask, match="result_ttl must not be negative"):
        client.enqueue("add", {}, result_ttl=-5)
    assert sorted(r.keys()) == keys
