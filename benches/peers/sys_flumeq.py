"""flumeq: Client.enqueue / enqueue_many; Engine.run(processes=P)."""

from __future__ import annotations

import sys
from typing import Any

import common

import flumeq

NAME = "flumeq"
SETTINGS = "Engine defaults (prefetch 512 per actor, read 1000, async concurrency 100); async handler for I/O-bound"
BULK = "enqueue_many"
ASYNC = True


def work_task(task: flumeq.Task) -> None:
    common.work()
    common.finish(task.payload)


async def work_task_async(task: flumeq.Task) -> None:
    await common.work_async()
    common.finish(task.payload)


def echo(task: flumeq.Task) -> int:
    return int(task.payload) + 1


class AsyncProducer:
    """AsyncClient.enqueue from many coroutines at once."""

    async def start(self) -> None:
        self.client = flumeq.AsyncClient(common.URL)
        await self.client.ping()

    async def send(self, payload: dict[str, Any]) -> None:
        await self.client.enqueue("work", payload, queue="bench")

    async def close(self) -> None:
        await self.client.close()


RESULTS = "Client.enqueue(result_ttl=60) then TaskInfo.result(): a blocking XREAD on the queue's ended stream"


class RoundTrip:
    def __init__(self) -> None:
        self.client = flumeq.Client(common.URL)

    def call(self, n: int) -> Any:
        return self.client.enqueue("echo", n, queue="bench", result_ttl=60).result(timeout=30)

    def close(self) -> None:
        self.client.close()


class Producer:
    def __init__(self) -> None:
        self.client = flumeq.Client(common.URL)
        self.client.ping()

    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        if bulk:
            for offset in range(0, len(payloads), 5000):
                chunk = payloads[offset : offset + 5000]
                self.client.enqueue_many([("work", p) for p in chunk], queue="bench")
        else:
            for payload in payloads:
                self.client.enqueue("work", payload, queue="bench")

    def close(self) -> None:
        self.client.close()


def worker(procs: int) -> list[list[str]]:
    return [[sys.executable, __file__, str(procs)]]


if __name__ == "__main__":
    handler = work_task_async if common.KIND == "io" else work_task
    engine = flumeq.Engine({"work": handler, "echo": echo}, common.URL, queues=("bench",))
    engine.run(processes=int(sys.argv[1]))
