"""``AsyncClient`` against a real Redis: shared round trips, the outage
buffer, results waited for from many coroutines, a loop that never blocks."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
import redis

import flumeq
from conftest import spawn_script
from flumeq.redis_server import RedisServer

STREAM = "flumeq:{default}:stream"


def test_concurrent_enqueues_share_round_trips(redis_url: str, r: redis.Redis) -> None:
    async def main() -> tuple[list[Any], int]:
        async with flumeq.AsyncClient(redis_url) as client:
            infos = await asyncio.gather(*(client.enqueue("t", {"n": n}) for n in range(1000)))
            return list(infos), client.round_trips

    infos, round_trips = asyncio.run(main())
    assert len({info.id for info in infos}) == 1000
    assert all(info.entry_id for info in infos)
    assert r.xlen(STREAM) == 1000
    payloads = [fields[b"payload"] for _, fields in r.xrange(STREAM)]
    assert payloads == [b'{"n":%d}' % n for n in range(1000)]
    assert round_trips < 50, round_trips


def test_one_cancelled_caller_leaves_its_batch_mates_alone(redis_url: str, r: redis.Redis) -> None:
    """Callers of one batch await one future: cancelling one of them (as
    ``wait_for`` does on its timeout) must not fail the others; the
    cancelled one gets ``CancelledError`` once the batch is written."""

    async def main() -> list[Any]:
        async with flumeq.AsyncClient(redis_url) as client:
            calls = [asyncio.ensure_future(client.enqueue("t", n)) for n in range(200)]
            await asyncio.sleep(0)  # every call has joined a batch
            assert calls[7].cancel()
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[7], asyncio.CancelledError)
    others = outcomes[:7] + outcomes[8:]
    assert all(isinstance(info, flumeq.TaskInfo) and info.entry_id for info in others), others
    # The cancelled call's task was on the wire already: it is written too.
    assert r.xlen(STREAM) == 200


def test_mixed_options_uniqueness_and_admin_calls(redis_url: str, r: redis.Redis) -> None:
    async def main() -> None:
        async with flumeq.AsyncClient(redis_url) as client:
            a, b, c, many = await asyncio.gather(
                client.enqueue("t", 1, queue="a"),
                client.enqueue("t", 2, delay=60),
                client.enqueue("t", 3, unique_key="k"),
                client.enqueue_many([("m", n) for n in range(5)], queue="a", max_retry=0),
            )
            assert (a.queue, b.entry_id, c.queue, len(many)) == ("a", None, "default", 5)
            with pytest.raises(flumeq.DuplicateTask):
                await client.enqueue("t", 4, unique_key="k")
            with pytest.raises(flumeq.InvalidTask, match="not JSON-serialisable"):
                await client.enqueue("t", {1, 2})
            stats = await client.stats("a")
            assert stats["ready"] == 6
            assert await client.dead_letters("a") == []
            assert await client.requeue_dead("a") == 0
            assert await client.purge_dead("a") == 0

    asyncio.run(main())
    assert r.xlen("flumeq:{a}:stream") == 6
    assert r.zcard("flumeq:{default}:delayed") == 1


def test_the_outage_buffer_behaves_as_in_client() -> None:
    server = RedisServer()

    async def main() -> None:
        client = flumeq.AsyncClient(server.url, timeout=0.5, buffer_size=3)
        infos = await asyncio.gather(*(client.enqueue("t", n) for n in range(3)))
        assert [info.entry_id for info in infos] == [None] * 3
        assert client.buffered == 3
        with pytest.raises(flumeq.BufferFull):
            await client.enqueue("t", 3)
        with server:
            info = await client.enqueue("t", 4)  # the buffer goes first
            assert info.entry_id is not None and client.buffered == 0
            r = redis.Redis.from_url(server.url)
            assert [f[b"payload"] for _, f in r.xrange(STREAM)] == [b"0", b"1", b"2", b"4"]
            r.close()
            await client.close()

    asyncio.run(main())


def test_many_coroutines_wait_on_one_reader_and_the_loop_keeps_running(
    redis_url: str, r: redis.Redis
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main() -> list[Any]:
        async with flumeq.AsyncClient(redis_url) as client:
            infos = await client.enqueue_many([("add", n) for n in range(200)], result_ttl=60)
            tick = asyncio.get_running_loop().create_task(ticker())
            waits = asyncio.gather(*(client.result(info, timeout=30) for info in infos))
            await asyncio.sleep(0.5)
            blocked = [c["cmd"] for c in r.client_list()].count("xread")
            before = ticks
            engine = spawn_script(
                """
                import sys, flumeq
                flumeq.Engine({"add": lambda t: t.payload + 1}, sys.argv[1]).run(processes=1)
                """,
                redis_url,
            )
            try:
                values = await waits
            finally:
                engine.send_signal(signal.SIGTERM)
                engine.wait(timeout=30)
            tick.cancel()
            assert blocked == 1, "200 waiters, one blocking read"
            assert before >= 30, "the loop ran while every waiter was blocked in Redis"
            return list(values)

    assert asyncio.run(main()) == [n + 1 for n in range(200)]


def test_async_waits_time_out_and_fail(redis_url: str) -> None:
    async def main() -> None:
        async with flumeq.AsyncClient(redis_url) as client:
            info = await client.enqueue("boom", {}, result_ttl=60, max_retry=0)
            started = time.monotonic()
            with pytest.raises(flumeq.ResultTimeout):
                await client.result(info, timeout=0.3)
            assert time.monotonic() - started < 2
            with pytest.raises(flumeq.InvalidTask, match="unknown"):
                await client.result(info.id, queue="elsewhere", timeout=1)

            def boom(task: flumeq.Task) -> None:
                raise RuntimeError("kaput")

            await asyncio.to_thread(
                flumeq.Engine({"boom": boom}, redis_url).run, processes=1, burst=True
            )
            with pytest.raises(flumeq.TaskFailed, match="kaput"):
                await client.result(info, timeout=5)

    asyncio.run(main())


def test_one_client_serves_waits_from_successive_loops(redis_url: str) -> None:
    client = flumeq.AsyncClient(redis_url)
    handlers = {"add": lambda task: task.payload + 1}
    for n in range(3):  # asyncio.run makes a new loop each time

        async def once(n: int = n) -> Any:
            info = await client.enqueue("add", n, result_ttl=60)
            waiting = asyncio.ensure_future(client.result(info, timeout=10))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(flumeq.Engine(handlers, redis_url).run, processes=1, burst=True)
            started = time.monotonic()
            value = await waiting
            # Woken by the blocking read, not by the 5 s safety look.
            assert time.monotonic() - started < 2.0
            return value

        assert asyncio.run(once()) == n + 1
    asyncio.run(client.close())
