"""Runs the example end to end on a private redis-server (or $FLUMEQ_URL)."""

import contextlib
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flumeq
from flumeq.redis_server import RedisServer


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(processName)s %(message)s")
    with contextlib.ExitStack() as stack:
        url = os.environ.get("FLUMEQ_URL") or stack.enter_context(RedisServer()).url
        import producer  # noqa: PLC0415
        import tasks  # noqa: PLC0415

        infos = producer.produce(url)
        tasks.engine.url = url
        report = tasks.engine.run(processes=2, burst=True)
        assert report["processed"] == len(infos), report
        for queue in ("critical", "default"):
            print(queue, flumeq.Client(url).stats(queue))
        print(f"basic: {report['processed']} tasks done")


if __name__ == "__main__":
    main()
