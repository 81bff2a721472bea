"""Fixtures: a real redis-server on a free loopback port, started by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import pytest
import redis

from flumeq.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared test server, flushed before each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


_per_process: dict[tuple[int, str], redis.Redis] = {}


def process_redis(url: str) -> redis.Redis:
    """A redis-py client for the current process (actors are forked)."""
    key = (os.getpid(), url)
    if key not in _per_process:
        _per_process[key] = redis.Redis.from_url(url)
    return _per_process[key]


def counting_handler(url: str) -> Callable[[Any], None]:
    """A handler that counts each run of each task id in the hash `runs`."""

    def handler(task: Any) -> None:
        process_redis(url).hincrby("runs", task.id, 1)

    return handler


def wait_until(
    predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def script_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a test script: it may ``from conftest import ...``."""
    env = dict(os.environ, **(extra or {}))
    tests = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    return env


def spawn_script(
    source: str, *args: str, env: Optional[dict[str, str]] = None
) -> subprocess.Popen[bytes]:
    """Runs a Python script in a fresh interpreter (its own process group);
    ``env`` adds variables."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        cwd=ROOT,
        env=script_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def dispatcher_pid(r: redis.Redis, consumer: str) -> Optional[int]:
    """The pid of the engine's dispatcher, from its named read connection."""
    prefix = f"flumeq:{consumer}:reader:"
    for client in r.client_list():
        name = str(client.get("name", ""))
        if name.startswith(prefix):
            return int(name.rsplit(":", 1)[1])
    return None


def kill_dispatcher(r: redis.Redis, consumer: str) -> None:
    """Kills the engine's dispatcher with -9 and waits for its replacement
    to connect."""
    killed = dispatcher_pid(r, consumer)
    assert killed is not None, f"no dispatcher of {consumer!r} is connected"
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: dispatcher_pid(r, consumer) not in (None, killed), timeout=20)


class Proxy:
    """A TCP proxy in front of a local port. Subclasses say whether a new
    connection is let in and how its two sides are served."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.admits():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.serve(client, upstream)

    def admits(self) -> bool:
        return True

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.server.close()


class CutProxy(Proxy):
    """A proxy that can be cut (every connection closed, new ones closed at
    once) and mended: an engine behind it is disconnected from Redis while
    the test's own clients are not."""

    def __init__(self, upstream_port: int) -> None:
        self.open = True
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        super().__init__(upstream_port)

    def admits(self) -> bool:
        return self.open

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        with self.lock:
            self.sockets += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for side in (source, sink):
            with contextlib.suppress(OSError):
                side.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            for side in self.sockets:
                with contextlib.suppress(OSError):
                    side.shutdown(socket.SHUT_RDWR)
                side.close()
            self.sockets.clear()

    def mend(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        super().close()


def tree(pid: int) -> list[psutil.Process]:
    """The engine's processes: the supervisor and all its descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def sigterm_group(
    engine: subprocess.Popen[bytes], processes: list[psutil.Process]
) -> tuple[float, float, str]:
    """SIGTERM to the engine's whole process group, as systemd sends it;
    returns how long it took to exit, the CPU seconds its ``processes``
    used meanwhile, and its stderr."""
    before = cpu_seconds(processes)
    started = time.monotonic()
    os.killpg(engine.pid, signal.SIGTERM)
    _, err = engine.communicate(timeout=60)
    took = time.monotonic() - started
    return took, cpu_seconds(processes) - before, err.decode()


def assert_stopped_in_bound(
    engine: subprocess.Popen[bytes], stop: tuple[float, float, str], gone: str
) -> None:
    """The engine stopped by ``sigterm_group`` (whose result is ``stop``)
    exited 0 within 15 s, and did not spin meanwhile, with ``gone`` (what
    the test killed) down."""
    took, used, log = stop
    assert engine.returncode == 0, log[-3000:]
    assert took < 15, f"shutdown took {took:.1f}s with {gone} gone"
    assert used < 0.5 * took, f"the engine spun: {used:.2f} CPU-s in {took:.1f}s"
