"""Kills a worker mid-run and shows nothing is lost (private redis-server,
or $FLUMEQ_URL)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

import flumeq
from flumeq.redis_server import RedisServer

WORKER = str(Path(__file__).resolve().parent / "worker.py")


def main() -> None:
    with contextlib.ExitStack() as stack:
        url = os.environ.get("FLUMEQ_URL") or stack.enter_context(RedisServer()).url
        conn = redis.Redis.from_url(url)
        infos = flumeq.Client(url).enqueue_many([("work", {"seconds": 0.05}) for _ in range(200)])
        first = subprocess.Popen([sys.executable, WORKER, url, "worker-a"], start_new_session=True)
        while conn.hlen("example:runs") < 40:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the whole worker, at once
        first.wait()
        print(f"killed worker-a after {conn.hlen('example:runs')} of {len(infos)} tasks")
        again = subprocess.run([sys.executable, WORKER, url, "worker-a", "burst"], check=True)
        assert again.returncode == 0
        runs = {key.decode(): int(value) for key, value in conn.hgetall("example:runs").items()}
        missing = [info.id for info in infos if info.id not in runs]
        twice = sum(count - 1 for count in runs.values())
        print(
            f"restarted worker-a finished the rest: {len(runs)} tasks done, {len(missing)} lost, {twice} ran twice"
        )
        assert not missing
        print("crash_recovery: done")


if __name__ == "__main__":
    main()
