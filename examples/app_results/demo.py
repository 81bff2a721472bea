"""Runs the example end to end on a private redis-server (or $FLUMEQ_URL):
an engine serves the app in the background, the producer waits for results."""

import asyncio
import contextlib
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flumeq
from flumeq.redis_server import RedisServer


def main() -> None:
    with contextlib.ExitStack() as stack:
        url = os.environ.get("FLUMEQ_URL") or stack.enter_context(RedisServer()).url
        import tasks  # noqa: PLC0415

        tasks.app.url = url
        # Enqueued before any engine runs: result() waits for them.
        sums = [tasks.add.enqueue(n, b=10) for n in range(5)]
        count = tasks.word_count.enqueue("the quick brown fox")
        bad = tasks.divide.enqueue(1, 0)

        engine = flumeq.Engine(tasks.app)  # serves "default" and "reports"
        runner = threading.Thread(target=engine.run, kwargs={"processes": 2})
        runner.start()
        try:
            print("sums:", [info.result(timeout=30) for info in sums])
            print("word count:", count.result(timeout=30))
            try:
                bad.result(timeout=30)
            except flumeq.TaskFailed as failure:
                print(f"divide failed ({failure.reason}): {failure.error}")

            async def from_asyncio() -> list[int]:
                async with flumeq.AsyncClient(url) as client:
                    infos = await asyncio.gather(*(tasks.add.aenqueue(n, n) for n in range(100)))
                    return await asyncio.gather(*(client.result(i, timeout=30) for i in infos))

            doubled = asyncio.run(from_asyncio())
            assert doubled == [2 * n for n in range(100)], doubled
            print("100 async enqueues and waits: ok")
        finally:
            engine.stop()
            runner.join(timeout=60)
        print("app_results: done")


if __name__ == "__main__":
    main()
