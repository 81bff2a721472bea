"""Real local Redis deployments for the tests: a TLS server with a CA made by
``openssl``, a Sentinel group (a master, a replica, three sentinels), a
cluster-enabled node owning every slot, and a 3-master Redis Cluster.
Everything runs on loopback ports in a temporary directory and is stopped
by the fixture that started it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import redis

from flumeq.redis_server import find_redis_server, free_port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def make_certificates(directory: Path, name: str = "ca") -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1/localhost and a
    client certificate, all signed by it (PEM files in ``directory``)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = f"{name}.key", f"{name}.crt"
    _openssl("genrsa", "-out", ca_key, "2048", cwd=directory)
    _openssl(
        "req", "-x509", "-new", "-key", ca_key, "-sha256", "-days", "2",
        "-subj", f"/CN=flumeq test {name}", "-out", ca, cwd=directory,
    )  # fmt: skip
    (directory / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for who in ("server", "client"):
        _openssl("genrsa", "-out", f"{who}.key", "2048", cwd=directory)
        _openssl(
            "req", "-new", "-key", f"{who}.key", "-subj", f"/CN={who}", "-out", f"{who}.csr",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", ca, "-CAkey", ca_key,
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "san.ext",
            "-out", f"{who}.crt", cwd=directory,
        )  # fmt: skip
    return {
        "ca": directory / ca,
        "server_cert": directory / "server.crt",
        "server_key": directory / "server.key",
        "client_cert": directory / "client.crt",
        "client_key": directory / "client.key",
    }


class Process:
    """One redis-server (or sentinel) process with its own directory."""

    def __init__(self, directory: Path, arguments: list[str], port: int) -> None:
        self.directory = directory
        self.port = port
        directory.mkdir(parents=True, exist_ok=True)
        self.process: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
            [find_redis_server(), *arguments],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        path = self.directory / "log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def _wait_ping(make: Any, process: Process, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = make()
            client.ping()
            client.close()
            return
        except redis.RedisError:
            if not process.alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis did not start on {process.port}:\n{process.log()}"
                ) from None
            time.sleep(0.05)


def _server_arguments(port: int, *extra: str) -> list[str]:
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--dir", ".", "--save", "",
        "--appendonly", "no", "--logfile", "log", "--daemonize", "no", *extra,
    ]  # fmt: skip


class TlsServer:
    """A redis-server that speaks TLS only, with certificates of its own CA.
    ``auth_clients`` is ``--tls-auth-clients`` (``yes`` asks for a client
    certificate)."""

    def __init__(self, auth_clients: str = "optional") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="flumeq-tls-"))
        self.files = make_certificates(self.root / "certs")
        self.other_ca = make_certificates(self.root / "other", name="other")["ca"]
        self.port = free_port()
        tls = [
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.files["server_cert"]),
            "--tls-key-file", str(self.files["server_key"]),
            "--tls-ca-cert-file", str(self.files["ca"]),
            "--tls-auth-clients", auth_clients,
        ]  # fmt: skip
        self.process = Process(self.root / "server", _server_arguments(0, *tls), self.port)
        _wait_ping(lambda: redis.Redis(**self.redis_kwargs()), self.process)

    def redis_kwargs(self) -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "ssl": True,
            "ssl_ca_certs": str(self.files["ca"]),
            "ssl_certfile": str(self.files["client_cert"]),
            "ssl_keyfile": str(self.files["client_key"]),
        }

    def url(self, *, client_cert: bool = False, ca: Optional[Path] = None, query: str = "") -> str:
        params = [f"ssl_ca_certs={ca or self.files['ca']}"]
        if client_cert:
            params += [
                f"ssl_certfile={self.files['client_cert']}",
                f"ssl_keyfile={self.files['client_key']}",
            ]
        if query:
            params.append(query)
        return f"rediss://127.0.0.1:{self.port}/0?" + "&".join(params)

    def close(self) -> None:
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class SentinelGroup:
    """A master, one replica and three sentinels (quorum 2, 1 s down-after)."""

    MASTER = "fqmain"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="flumeq-sentinel-"))
        self.servers: list[Process] = []
        master_port = free_port()
        self.servers.append(Process(self.root / "s0", _server_arguments(master_port), master_port))
        replica_port = free_port()
        self.servers.append(
            Process(
                self.root / "s1",
                _server_arguments(replica_port, "--replicaof", "127.0.0.1", str(master_port)),
                replica_port,
            )
        )
        for server in self.servers:
            _wait_ping(lambda s=server: redis.Redis(port=s.port), server)
        self.sentinels: list[Process] = []
        for index in range(3):
            port = free_port()
            directory = self.root / f"sentinel{index}"
            directory.mkdir()
            (directory / "sentinel.conf").write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\nlogfile log\ndir .\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 3000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
            )
            process = Process(directory, ["sentinel.conf", "--sentinel"], port)
            self.sentinels.append(process)
            _wait_ping(lambda p=port: redis.Redis(port=p), process)
        self.wait_ready()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.MASTER}/0"

    def sentinel(self) -> redis.Redis:
        """A client of the first sentinel still running."""
        alive = next(s for s in self.sentinels if s.alive())
        return redis.Redis(port=alive.port, decode_responses=True)

    def master_port(self) -> int:
        _, port = self.sentinel().sentinel_get_master_addr_by_name(self.MASTER)
        return int(port)

    def master(self) -> redis.Redis:
        return redis.Redis(port=self.master_port())

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every sentinel knows the replica and the other sentinels, and
        the replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                alive = [s for s in self.sentinels if s.alive()]
                ready = all(
                    int(info["num-slaves"]) >= 1
                    and int(info["num-other-sentinels"]) >= len(alive) - 1
                    for info in (
                        redis.Redis(port=s.port, decode_responses=True).sentinel_master(self.MASTER)
                        for s in alive
                    )
                )
                replication = self.master().info("replication")
                if ready and replication.get("connected_slaves", 0) >= 1:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the sentinel group did not get ready")

    def failover(self, timeout: float = 30.0) -> int:
        """Forces a failover; returns the new master's port once a replica of
        it is back in sync."""
        old = self.master_port()
        self.sentinel().execute_command("SENTINEL", "FAILOVER", self.MASTER)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                new = self.master_port()
                if new != old and self.master().info("replication")["role"] == "master":
                    self.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
                    return new
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the failover did not complete")

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def cluster_port() -> int:
    """A free port that a cluster node can use: at most 55535, with its bus
    port (10000 above) free too."""
    while True:
        port = free_port()
        if port <= 55535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _cluster_arguments() -> list[str]:
    return [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "5000",
    ]  # fmt: skip


def _wait_cluster_ok(port: int, timeout: float = 20.0) -> None:
    admin = redis.Redis(port=port, decode_responses=True)
    deadline = time.monotonic() + timeout
    while "cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster node {port} did not reach cluster_state:ok")
        time.sleep(0.05)


class Cluster:
    """A Redis Cluster of three masters and no replicas, made with
    ``redis-cli --cluster create`` as an operator would."""

    def __init__(self, masters: int = 3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="flumeq-cluster3-"))
        self.ports = []
        for _ in range(masters):
            port = cluster_port()
            while port in self.ports:
                port = cluster_port()
            self.ports.append(port)
        self.processes = []
        for port in self.ports:
            process = Process(
                self.root / str(port), _server_arguments(port, *_cluster_arguments()), port
            )
            self.processes.append(process)
            _wait_ping(lambda port=port: redis.Redis(port=port), process)
        cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
        self.cli = cli
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for port in self.ports:
            _wait_cluster_ok(port)
        # Every node must know every other's slots before the tests start.
        deadline = time.monotonic() + 20
        while not all(self._sees_all(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster nodes do not agree on the slots")
            time.sleep(0.05)

    @staticmethod
    def _sees_all(port: int) -> bool:
        slots = redis.Redis(port=port).execute_command("CLUSTER", "SLOTS")
        return sum(int(row[1]) - int(row[0]) + 1 for row in slots) == 16384

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def client(self) -> Any:
        """redis-py's cluster client, for checks."""
        from redis.cluster import RedisCluster  # noqa: PLC0415

        return RedisCluster(host="127.0.0.1", port=self.ports[0])

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``."""
        admin = redis.Redis(port=self.ports[0])
        slot = int(admin.execute_command("CLUSTER", "KEYSLOT", key))
        for row in admin.execute_command("CLUSTER", "SLOTS"):
            if int(row[0]) <= slot <= int(row[1]):
                return int(row[2][1])
        raise LookupError(key)

    def node_id(self, port: int) -> str:
        return str(redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER", "MYID"))

    def move_slot(self, slot: int, target: int, during: Optional[Callable[[], None]] = None) -> int:
        """Moves ``slot`` with its keys to the master at ``target`` by hand,
        the way ``redis-cli --cluster reshard`` does (SETSLOT IMPORTING and
        MIGRATING, MIGRATE in batches, SETSLOT NODE on every master).
        With ``during``, the keys other than streams move first, then
        ``during`` runs with the slot half migrated (ASK and TRYAGAIN
        answered), then the streams move. Returns how many keys moved."""
        admin = redis.Redis(port=self.ports[0])
        source = next(
            int(row[2][1])
            for row in admin.execute_command("CLUSTER", "SLOTS")
            if int(row[0]) <= slot <= int(row[1])
        )
        if source == target:
            return 0
        src, dst = redis.Redis(port=source), redis.Redis(port=target)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        if during is not None:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1_000_000)
            first = [key for key in keys if not key.endswith(b":stream")]
            for at in range(0, len(first), 10):
                batch = first[at : at + 10]
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *batch)
                moved += len(batch)
            during()
        while True:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
            if not keys:
                break
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for port in (target, source, *(p for p in self.ports if p not in (source, target))):
            redis.Redis(port=port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class ClusterNode:
    """One cluster-enabled redis-server that owns all 16384 slots. It keeps
    Redis Cluster's rules (a command, script or MULTI whose keys are on
    different slots fails with CROSSSLOT; a script may touch only the keys
    it declares) while a plain ``redis://`` connection reaches every key."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="flumeq-cluster-"))
        self.port = cluster_port()
        self.process = Process(
            self.root / "node", _server_arguments(self.port, *_cluster_arguments()), self.port
        )
        _wait_ping(lambda: redis.Redis(port=self.port), self.process)
        admin = redis.Redis(port=self.port, decode_responses=True)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster node did not reach cluster_state:ok")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)
