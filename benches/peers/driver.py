"""Runs one system's producer side inside that system's virtualenv.

python driver.py SYSTEM enqueue --n N [--bulk]    -> {"seconds": ...}
python driver.py SYSTEM latency --n N --rate R    -> {"seconds": ...}
python driver.py SYSTEM argv --procs P            -> [[worker argv], ...]
python driver.py SYSTEM info                      -> {"name", "settings", "bulk", "async", "version"}
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system")
    parser.add_argument("action", choices=["enqueue", "latency", "argv", "info"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--bulk", action="store_true")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    system = importlib.import_module(f"sys_{args.system}")
    if args.action == "argv":
        print(json.dumps(system.worker(args.procs)))
    elif args.action == "info":
        distribution = {"taskiq": "taskiq-redis"}.get(args.system, args.system)
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        print(
            json.dumps(
                {
                    "name": system.NAME,
                    "settings": system.SETTINGS,
                    "bulk": system.BULK,
                    "async": system.ASYNC,
                    "version": version,
                }
            )
        )
    elif args.action == "enqueue":
        producer = system.Producer()
        payloads = [{"n": i} for i in range(args.n)]
        started = time.perf_counter()
        producer.send(payloads, args.bulk)
        elapsed = time.perf_counter() - started
        producer.close()
        print(json.dumps({"seconds": elapsed}))
    else:
        producer = system.Producer()
        producer.send([{"n": -1}], False)  # connect and warm up first
        started = time.perf_counter()
        interval = 1.0 / args.rate
        for i in range(args.n):
            pause = started + i * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            producer.send([{"n": i, "sent_at": time.time()}], False)
        elapsed = time.perf_counter() - started
        producer.close()
        print(json.dumps({"seconds": elapsed}))


if __name__ == "__main__":
    main()
