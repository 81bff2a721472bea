"""Completed tasks kept in Redis without PostgreSQL (``retention``): their
summaries, found by task lookups, bounded per queue, pruned when expired."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from click.testing import CliRunner

import flumeq
from flumeq.cli import main


def ok(task: flumeq.Task) -> Any:
    return {"sum": sum(task.payload)}


def failing(task: flumeq.Task) -> None:
    raise RuntimeError("broken on purpose")


def run(url: str, **options: Any) -> dict[str, int]:
    engine = flumeq.Engine({"ok": ok, "fail": failing}, url, retry_base=0, **options)
    return engine.run(processes=1, burst=True)


def test_a_completed_task_is_found_by_its_summary(redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    kept = client.enqueue("ok", [1, 2], retention=60, labels={"order": "17"})
    gone = client.enqueue("ok", [3])
    dead = client.enqueue("fail", None, retention=60, max_retry=0, task_id="dead-1")
    run(redis_url)
    admin = flumeq.Admin(redis_url)
    [hit] = admin.find_task(kept.id)
    assert hit["completed"] is True and hit["state"] == "done" and hit["queue"] == "default"
    assert hit["type"] == "ok" and hit["payload"] == "[1,2]" and hit["result"] == '{"sum":3}'
    assert json.loads(hit["labels"]) == {"order": "17"}
    assert hit["attempts"] == 1 and hit["worker"]
    assert hit["enqueued_at"] <= hit["started_at"] <= hit["finished_at"] <= time.time()
    assert admin.find_task(gone.id) == []  # no retention: no trace
    # A dead one: its dead letter (with the entry to requeue), the summary
    # only once the letter is gone.
    [letter] = admin.find_task("dead-1")
    assert letter["state"] == "dead" and "entry_id" in letter
    admin.purge_dead("default")
    [summary] = admin.find_task("dead-1")
    assert summary["completed"] and summary["state"] == "dead"
    assert summary["reason"] == "error" and "broken on purpose" in summary["error"]
    assert "RuntimeError" in summary["traceback"] and dead.id == "dead-1"

    shown = CliRunner().invoke(main, ["task", kept.id, "--url", redis_url])
    assert shown.exit_code == 0, shown.output
    assert "state: done" in shown.output and '{"sum":3}' in shown.output
    missing = CliRunner().invoke(main, ["task", gone.id, "--url", redis_url])
    assert missing.exit_code == 1 and "not in Redis" in missing.output


def test_summaries_are_bounded_per_queue_and_expire(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("ok", [n]) for n in range(300)], retention=3600)
    run(redis_url, retention_max=50)
    assert r.hlen("flumeq:{default}:completed") == 50
    assert r.zcard("flumeq:{default}:completed:expiry") == 50
    short = client.enqueue("ok", [1], retention=5, queue="brief")
    run(redis_url, queues=("brief",))
    [hit] = flumeq.Admin(redis_url).find_task(short.id)
    time.sleep(max(0.0, hit["finished_at"] + 5.05 - time.time()))
    assert flumeq.Admin(redis_url).find_task(short.id) == []  # expired, not yet pruned
    client.enqueue("ok", [2], retention=60, queue="brief")
    run(redis_url, queues=("brief",))
    assert r.hexists("flumeq:{brief}:completed", short.id) == 0  # pruned by the next write
    assert r.hlen("flumeq:{brief}:completed") == 1


def test_retention_is_an_option_of_every_way_to_enqueue(redis_url: str, r: redis.Redis) -> None:
    app = flumeq.App(redis_url)

    @app.task(retention=30)
    def add(a: int, b: int = 0) -> int:
        return a + b

    add.enqueue(1, b=2)
    add.options(retention=90).enqueue(3)
    entries = [fields for _, fields in r.xrange("flumeq:{default}:stream")]
    assert [fields[b"retention"] for fields in entries] == [b"30", b"90"]
    cron = flumeq.Cron(60.0, "ok", [1], retention=5)
    assert cron.call(()).retention_ms == 5000
    try:
        flumeq.Client(redis_url).enqueue("ok", None, retention="long")
    except flumeq.InvalidTask as error:
        assert "retention" in str(error)
    else:
        raise AssertionError("a bad retention was accepted")
