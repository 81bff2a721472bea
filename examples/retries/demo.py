"""Runs the example end to end on a private redis-server (or $FLUMEQ_URL)."""

import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flumeq
from flumeq.redis_server import RedisServer


def main() -> None:
    with contextlib.ExitStack() as stack:
        url = os.environ.get("FLUMEQ_URL") or stack.enter_context(RedisServer()).url
        import tasks  # noqa: PLC0415

        client = flumeq.Client(url)
        client.enqueue("card:charge", {"order": 7}, max_retry=5)
        client.enqueue("inventory:sync", {"sku": "A-1"}, max_retry=3)
        client.enqueue("csv:import", {"file": "broken.csv"}, max_retry=3)
        report_task = client.enqueue("report:render", {"id": 42}, max_retry=2)
        # Seconds instead of minutes, for the demo.
        tasks.engine.url, tasks.engine.retry_base, tasks.engine.retry_max = url, 0.05, 0.2
        report = tasks.engine.run(processes=2, burst=True)
        print("engine:", report)
        dead = client.dead_letters()
        for letter in dead:
            print(f"dead: {letter['type']} reason={letter['reason']} attempts={letter['attempts']}")
            print(f"      {letter['error']}")
        assert sorted(letter["type"] for letter in dead) == ["csv:import", "report:render"], dead
        assert report["processed"] == 2 and report["retried"] >= 4, report
        # After the bug is fixed: run the report again, from attempt 0.
        assert client.requeue_dead(ids=[report_task.id]) == 1
        print("requeued the report; purged", client.purge_dead(), "other dead letter(s)")
        print("retries: done")


if __name__ == "__main__":
    main()
