"""Client: entries on a real Redis, URL resolution, validation before any write."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

import flumeq
from conftest import wait_until
from flumeq.redis_server import RedisServer, free_port

STREAM = "flumeq:{default}:stream"


def fields(r: redis.Redis, stream: str = STREAM) -> list[dict[str, str]]:
    return [
        {key.decode(): value.decode() for key, value in entry.items()}
        for _, entry in r.xrange(stream)
    ]


def test_enqueue_writes_plain_readable_fields(redis_url: str, r: redis.Redis) -> None:
    before = time.time()
    deadline = datetime.now(timezone.utc) + timedelta(hours=1)
    with flumeq.Client(redis_url) as client:
        info = client.enqueue(
            "email:send",
            {"to": "a@example.com"},
            max_retry=3,
            timeout=2.5,
            deadline=deadline,
            unique_key="welcome:42",
            labels={"tenant": "acme"},
        )
    [entry] = fields(r)
    assert entry["id"] == info.id and len(info.id) == 32
    assert entry["type"] == "email:send"
    assert json.loads(entry["payload"]) == {"to": "a@example.com"}
    assert entry["attempt"] == "0"
    assert entry["max_retry"] == "3"
    assert entry["timeout"] == "2.5"
    assert before * 1000 - 5 <= int(entry["enqueued_at"]) <= time.time() * 1000 + 5
    assert int(entry["deadline"]) == int(deadline.timestamp() * 1000)
    assert entry["unique_key"] == "welcome:42"
    assert json.loads(entry["labels"]) == {"tenant": "acme"}
    assert info.queue == "default" and info.type == "email:send"
    assert r.sismember("flumeq:queues", "default")


def test_defaults_and_custom_task_id(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("noop", task_id="order-17", queue="billing")
    [entry] = fields(r, "flumeq:{billing}:stream")
    assert info.id == "order-17"
    assert entry["payload"] == "null"
    assert entry["max_retry"] == str(flumeq.DEFAULT_MAX_RETRY) == "25"
    assert entry["timeout"] == "30"
    assert "labels" not in entry and "deadline" not in entry


def test_enqueue_many_keeps_order_and_gives_unique_ids(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    items = [("count", {"n": n}) for n in range(4500)] + [("count", {"n": -1}, "fixed-id")]
    infos = client.enqueue_many(items, queue="bulk", max_retry=1, timeout=None)
    assert len(infos) == 4501
    assert len({info.id for info in infos}) == 4501
    assert infos[-1].id == "fixed-id"
    stored = fields(r, "flumeq:{bulk}:stream")
    assert [json.loads(entry["payload"])["n"] for entry in stored[:4500]] == list(range(4500))
    assert [entry["id"] for entry in stored] == [info.id for info in infos]
    assert stored[0]["timeout"] == "0" and stored[0]["max_retry"] == "1"
    assert client.enqueue_many([]) == []


def test_url_comes_from_argument_then_env_then_default(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("FLUMEQ_URL", redis_url)
    assert flumeq.Client().url == redis_url
    assert flumeq.Client("redis://example.invalid:1/2").url == "redis://example.invalid:1/2"
    monkeypatch.delenv("FLUMEQ_URL")
    assert flumeq.Client().url == flumeq.DEFAULT_URL == "redis://127.0.0.1:6379/0"
    flumeq.Client().close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.enqueue("t", {"x": object()}), "payload is not JSON-serialisable"),
        (lambda c: c.enqueue("t", delay=-1), "delay must not be negative"),
        (lambda c: c.enqueue("t", delay="soon"), "delay must be seconds or a timedelta"),
        (lambda c: c.enqueue("t", at="tomorrow"), "at must be a datetime"),
        (lambda c: c.enqueue("t", priority=3), "unknown option(s) priority"),
        (lambda c: c.enqueue("t", queue="a{b}"), "would break the Redis Cluster hash tag"),
        (lambda c: c.enqueue("t", labels={"a": 1}), "labels must be a mapping of str to str"),
        (lambda c: c.enqueue("t", max_retry=-2), "max_retry must be an integer >= 0"),
        (lambda c: c.enqueue("", {}), "task type must be a non-empty string"),
        (
            lambda c: c.enqueue_many([("t", {}), ("t", {1j})]),
            "item 1 (task 't'): payload is not JSON",
        ),
        (lambda c: c.enqueue_many([("t",)]), "item 0: expected (type, payload)"),
    ],
)
def test_bad_input_raises_before_any_write(
    redis_url: str, r: redis.Redis, call: object, message: str
) -> None:
    client = flumeq.Client(redis_url)
    with pytest.raises(flumeq.InvalidTask) as raised:
        call(client)  # type: ignore[operator]
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert r.dbsize() == 0


def test_stats_counts_ready_tasks(redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    assert client.stats("empty") == {
        "ready": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead": 0,
        "processed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    client.enqueue_many([("t", n) for n in range(7)])
    assert client.stats()["ready"] == 7


def test_unreachable_redis_is_a_clear_error() -> None:
    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    client = flumeq.Client(url, timeout=0.5, buffer_size=0)
    with pytest.raises(flumeq.RedisUnavailable) as raised:
        client.enqueue("t", {})
    assert isinstance(raised.value, ConnectionError)
    buffering = flumeq.Client(url, timeout=0.5)
    assert buffering.enqueue("t", {}).entry_id is None
    with pytest.raises(flumeq.RedisUnavailable) as raised:
        buffering.close()
    assert "1 buffered task(s)" in str(raised.value)
    with pytest.raises(flumeq.BufferFull) as full:
        flumeq.Client(url, timeout=0.5, buffer_size=1).enqueue_many([("t", 1), ("t", 2)])
    assert "user:***@127.0.0.1" in str(full.value) and "secret" not in str(full.value)
    with pytest.raises(flumeq.ConfigError):
        flumeq.Client("notaurl://x")


def _wait_child(pid: int, timeout: float = 30.0) -> int:
    """The exit code of forked child ``pid``; kills it if it takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child did not finish in time")


def _entries(r: redis.Redis) -> list[tuple[str, dict[str, str]]]:
    return [
        (entry_id.decode(), {key.decode(): value.decode() for key, value in entry.items()})
        for entry_id, entry in r.xrange(STREAM)
    ]


def test_parent_and_forked_child_draw_different_task_ids(redis_url: str, r: redis.Redis) -> None:
    flumeq.Client(redis_url).enqueue("before", 0)  # the id generator has state before the fork
    pid = os.fork()
    if pid == 0:  # the child: a client of its own, 50 tasks
        code = 1
        try:
            infos = flumeq.Client(redis_url).enqueue_many([("child", n) for n in range(50)])
            code = 0 if len({info.id for info in infos}) == 50 else 2
        finally:
            os._exit(code)
    assert _wait_child(pid) == 0
    flumeq.Client(redis_url).enqueue_many([("parent", n) for n in range(50)])
    ids = [entry["id"] for _, entry in _entries(r)]
    assert len(ids) == len(set(ids)) == 101
    assert all(len(id_) == 32 and id_[12] == "4" and id_[16] in "89ab" for id_ in ids)


def _check_infos(infos: list[flumeq.TaskInfo], type_: str, r: redis.Redis) -> str:
    """Why ``infos`` do not match the stream's entries ("" when they do)."""
    stream = {entry["id"]: (entry_id, entry) for entry_id, entry in _entries(r)}
    for number, info in enumerate(infos):
        if info.id not in stream:
            return f"{type_} task {number}: id {info.id} not in the stream"
        entry_id, entry = stream[info.id]
        if (entry_id, entry["type"], entry["payload"]) != (info.entry_id, type_, str(number)):
            return f"{type_} task {number}: {info} does not match entry {entry_id} {entry}"
    return ""


def test_client_used_before_fork_gets_its_own_connection_in_the_child(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue("before", 0)  # the connection exists before the fork
    r.delete(STREAM)
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: enqueue 200 tasks while the parent does too
        code = 1
        try:
            os.close(go_write)
            os.read(go_read, 1)
            infos = [client.enqueue("child", n) for n in range(200)]
            own = redis.Redis.from_url(redis_url)  # not the parent's `r`
            wait_until(lambda: own.xlen(STREAM) == 400, timeout=20)
            code = 0 if not _check_infos(infos, "child", own) else 2
        finally:
            os._exit(code)
    os.close(go_read)
    os.write(go_write, b"g")
    os.close(go_write)
    infos = [client.enqueue("parent", n) for n in range(200)]
    assert _wait_child(pid) == 0
    assert _check_infos(infos, "parent", r) == ""
    entries = _entries(r)
    assert len(entries) == r.xlen(STREAM) == 400
    assert len({entry["id"] for _, entry in entries}) == 400
    assert client.stats()["ready"] == 400  # the parent's connection still works


def test_forked_child_starts_with_an_empty_buffer() -> None:
    server = RedisServer()
    client = flumeq.Client(server.url, timeout=0.5)
    client.enqueue_many([("parent", n) for n in range(3)])  # redis is not up yet
    assert client.buffered == 3
    with server:
        pid = os.fork()
        if pid == 0:  # the child writes only its own task, not the parent's three
            code = 1
            try:
                code = 0 if client.buffered == 0 else 2
                client.enqueue("child", 0)
                code = code or (0 if redis.Redis.from_url(server.url).xlen(STREAM) == 1 else 3)
            finally:
                os._exit(code)
        assert _wait_child(pid) == 0
        assert client.buffered == 3
        assert client.flush() == 3
        r = redis.Redis.from_url(server.url)
        assert sorted(entry["type"] for _, entry in _entries(r)) == ["child"] + ["parent"] * 3
        r.close()
