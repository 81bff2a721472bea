"""Smoke test of an installed flumeq: what CI runs in fresh virtualenvs of
CPython 3.9 and 3.13 that hold only the wheel and its dependencies, with no
Rust toolchain. Enqueues 10k tasks, drains them with a burst engine of two
processes, runs an ``@app.task`` and waits for its result, then starts the dashboard, fetches its overview and stops it;
without the ``web`` extra it checks instead that ``flumeq ui`` names it.

    python scripts/smoke.py
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.util import find_spec

import flumeq
from flumeq.redis_server import RedisServer

TASKS = 10_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dashboard(url: str) -> None:
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "flumeq", "ui", "--port", str(port), "--url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    assert page.status == 200, page.status
                api = f"http://127.0.0.1:{port}/api/overview"
                with urllib.request.urlopen(api, timeout=5) as overview:
                    assert b'"default"' in overview.read(), "the overview lacks queue 'default'"
                break
            except (urllib.error.URLError, ConnectionError):
                if ui.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"flumeq ui did not serve: {ui.stderr.read().decode()}"
                    ) from None
                time.sleep(0.1)
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(15)
        except subprocess.TimeoutExpired:
            ui.kill()
            raise SystemExit("flumeq ui did not stop on SIGINT") from None


def main() -> None:
    started = time.monotonic()
    with RedisServer() as server:
        client = flumeq.Client(server.url)
        client.enqueue_many([("noop", {"n": n}) for n in range(TASKS)])
        report = flumeq.Engine({"noop": lambda task: None}, server.url).run(processes=2, burst=True)
        assert report["processed"] == TASKS, report
        stats = client.stats()
        assert (stats["ready"], stats["in_flight"], stats["processed"]) == (0, 0, TASKS), stats
        app = flumeq.App(server.url, result_ttl=60)

        @app.task
        def add(a: int, b: int = 0) -> int:
            return a + b

        info = add.enqueue(2, b=3)
        flumeq.Engine(app).run(processes=1, burst=True)
        assert info.result(timeout=10) == 5
        if find_spec("starlette") is not None:
            dashboard(server.url)
            part = "dashboard served"
        else:
            refused = subprocess.run(
                [sys.executable, "-m", "flumeq", "ui", "--url", server.url],
                capture_output=True,
                text=True,
                check=False,
            )
            assert refused.returncode == 1, refused
            assert "pip install 'flumeq[web]'" in refused.stderr, refused.stderr
            part = "no web extra: flumeq ui names it"
    print(
        f"smoke ok: flumeq {flumeq.__version__} on Python {sys.version.split()[0]} "
        f"from {flumeq.__file__} in {time.monotonic() - started:.1f}s ({part})"
    )


if __name__ == "__main__":
    main()
