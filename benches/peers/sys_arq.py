"""arq: pool.enqueue_job(); `arq WorkerSettings` (async, one process each)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import common
from arq import create_pool
from arq.connections import RedisSettings

NAME = "arq"
SETTINGS = "defaults (max_jobs 10, poll_delay 0.5 s); async handler; one process per worker"
BULK = None
ASYNC = True


async def work_task(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await common.work_async()
    common.finish(payload)


async def echo(ctx: dict[str, Any], n: int) -> int:
    return n + 1


class WorkerSettings:
    functions = [work_task, echo]
    redis_settings = RedisSettings.from_dsn(common.URL)


class AsyncProducer:
    """pool.enqueue_job from many coroutines at once."""

    async def start(self) -> None:
        self.pool = await create_pool(RedisSettings.from_dsn(common.URL))

    async def send(self, payload: dict[str, Any]) -> None:
        await self.pool.enqueue_job("work_task", payload)

    async def close(self) -> None:
        await self.pool.aclose()


RESULTS = "enqueue_job then await job.result() (polls every 0.5 s by default, as documented)"


class RoundTrip:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(RedisSettings.from_dsn(common.URL)))

    def call(self, n: int) -> Any:
        async def run() -> Any:
            job = await self.pool.enqueue_job("echo", n)
            assert job is not None
            return await job.result(timeout=30)

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())


class Producer:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(RedisSettings.from_dsn(common.URL)))

    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        async def run() -> None:
            for payload in payloads:
                await self.pool.enqueue_job("work_task", payload)

        self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())


def worker(procs: int) -> list[list[str]]:
    return [[sys.executable, "-m", "arq", "sys_arq.WorkerSettings"] for _ in range(procs)]
