"""A decorated app: typed tasks, sync and async, whose results are kept.

Serve it with `flumeq worker tasks -p 2` (the module's `app`)."""

import asyncio

import flumeq

app = flumeq.App(result_ttl=600)  # outcomes kept 10 minutes


@app.task
def add(a: int, b: int = 0) -> int:
    return a + b


@app.task(name="report:word_count", queue="reports", max_retry=2, timeout=10.0)
async def word_count(text: str) -> dict[str, int]:
    task = flumeq.current_task()
    assert task is not None
    await asyncio.sleep(0.01)  # an async handler: many run at once per actor
    return {"words": len(text.split()), "attempt": task.attempt}


@app.task(max_retry=0)
def divide(a: float, b: float) -> float:
    return a / b
