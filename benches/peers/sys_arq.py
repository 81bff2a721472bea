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


class WorkerSettings:
    functions = [work_task]
    redis_settings = RedisSettings.from_dsn(common.URL)


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
