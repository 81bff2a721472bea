"""A throwaway PostgreSQL cluster for tests and benches: ``initdb`` in a temp
dir, run as a non-root user, on a free loopback port, with password
authentication over TCP (user ``flumeq``, password ``secret``)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

USER = "flumeq"
PASSWORD = "secret"
DATABASE = "flumeq"


def bin_dir() -> Optional[Path]:
    """Where Debian's PostgreSQL binaries are (newest version), if installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: float(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """``with PostgresServer() as server: server.dsn``; ``stop()`` and
    ``start()`` take it away and bring it back on the same port."""

    def __init__(self) -> None:
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup.sh installs it)")
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="flumeq-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root. setpriv execs
            # (no parent left in between), so signals reach postgres itself.
            self.as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
            shutil.chown(self.root, "postgres")
        self.dsn = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, cwd=self.root)

    def __enter__(self) -> PostgresServer:
        password_file = self.root / "password"
        password_file.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(password_file, "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={password_file}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start()
        self._run(
            str(self.bin / "createdb"),
            "-h",
            str(self.root),
            "-p",
            str(self.port),
            "-U",
            USER,
            DATABASE,
        )
        return self

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *self.as_user,
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log", "ab"),  # noqa: SIM115 - the server holds it
            cwd=self.root,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                ready = subprocess.run(
                    [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                    capture_output=True,
                    check=False,
                )
                if ready.returncode == 0:
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'log').read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("postgres did not start in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT: a "fast" shutdown (SIGTERM's "smart" one waits for clients).
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __exit__(self, *_: object) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
