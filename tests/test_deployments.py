"""flumeq on the Redis deployments teams run: TLS (a CA made here by
openssl), ACL users with the least privilege the docs give, and Sentinel
with a forced failover mid-drain. Each deployment is started once per
module, on loopback ports, by the fixtures below."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import redis
from deployments import Cluster, ClusterNode, Process, SentinelGroup, TlsServer
from scenario import run_features, runs, start_engine, stop_engine

import flumeq
from conftest import (
    ROOT,
    assert_stopped_in_bound,
    counting_handler,
    sigterm_group,
    spawn_script,
    tree,
    wait_until,
)
from flumeq.redis_server import RedisServer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsServer]:
    server = TlsServer(auth_clients="optional")
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls() -> Iterator[TlsServer]:
    server = TlsServer(auth_clients="yes")
    yield server
    server.close()


@pytest.fixture
def counter(redis_url: str) -> str:
    """A plain Redis where the handlers count their runs."""
    return redis_url


def flush_tls(server: TlsServer) -> None:
    redis.Redis(**server.redis_kwargs()).flushall()


def test_every_feature_over_tls(tls: TlsServer, counter: str) -> None:
    flush_tls(tls)
    run_features(tls.url(), counter)


def test_client_certificate_is_sent_when_asked(mtls: TlsServer, counter: str) -> None:
    flush_tls(mtls)
    with pytest.raises(flumeq.RedisUnavailable, match=r"(?i)certificate"):
        flumeq.Client(mtls.url()).stats()
    url = mtls.url(client_cert=True)
    infos = flumeq.Client(url).enqueue_many([("count", {"n": n}) for n in range(300)])
    report = flumeq.Engine({"count": counting_handler(counter)}, url).run(processes=1, burst=True)
    assert report["processed"] == 300
    assert runs(counter) == {info.id: 1 for info in infos}


def test_tls_mistakes_fail_fast_and_clearly(tls: TlsServer) -> None:
    started = time.monotonic()
    with pytest.raises(flumeq.RedisUnavailable):
        flumeq.Client(f"redis://127.0.0.1:{tls.port}/0").stats()
    with pytest.raises(flumeq.RedisUnavailable, match=r"(?i)certificate|issuer"):
        flumeq.Client(tls.url(ca=tls.other_ca)).stats()
    assert time.monotonic() - started < 5
    # ssl_cert_reqs=none: encrypted, the certificate not checked.
    none = f"rediss://127.0.0.1:{tls.port}/0?ssl_cert_reqs=none"
    assert flumeq.Client(none).stats()["dead"] >= 0
    with pytest.raises(flumeq.ConfigError, match="ssl_ca_certs"):
        flumeq.Client(f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs=/nonexistent/ca.pem")
    with pytest.raises(flumeq.ConfigError, match="ssl_cert_reqs"):
        flumeq.Client(f"rediss://127.0.0.1:{tls.port}/0?ssl_cert_reqs=sometimes")


# --- ACL users ---------------------------------------------------------------

OPERATIONS = ROOT / "docs" / "deployments.md"


def documented_acl(role: str) -> str:
    """The ``ACL SETUSER`` rules the docs give for ``role`` (engine, producer,
    dashboard): the test runs with exactly what users are told to grant."""
    text = OPERATIONS.read_text()
    found = re.search(rf"ACL SETUSER flumeq-{role} (.+)", text)
    assert found, f"docs/deployments.md gives no ACL for {role}"
    return found.group(1).replace("<password>", f"{role}-secret")


def documented_cluster_acl(role: str) -> str:
    """What the docs add to ``role``'s rules on a cluster (its later line)."""
    found = re.findall(rf"ACL SETUSER flumeq-{role} (.+)", OPERATIONS.read_text())
    assert len(found) == 2, f"docs/deployments.md gives no cluster ACL for {role}"
    return str(found[1])


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_every_feature_with_least_privilege_acl_users(
    acl_server: RedisServer, counter: str
) -> None:
    admin = redis.Redis.from_url(acl_server.url)
    admin.flushall()
    admin.execute_command("ACL", "LOG", "RESET")
    for role in ("engine", "producer", "dashboard"):
        admin.execute_command("ACL", "SETUSER", f"flumeq-{role}", "reset")
        admin.execute_command("ACL", "SETUSER", f"flumeq-{role}", *documented_acl(role).split())
    port = acl_server.port

    def url(role: str) -> str:
        return f"redis://flumeq-{role}:{role}-secret@127.0.0.1:{port}/0"

    # The producer enqueues, waits for results, cancels and pauses; the
    # engine runs everything; the dashboard and `flumeq stats` read.
    run_features_as(url("engine"), url("producer"), url("dashboard"), counter)
    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], f"commands refused by the documented ACL: {denied}"
    # The producer cannot run work, nor the dashboard write.
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(url("dashboard")).xadd("flumeq:{default}:stream", {"x": "1"})
    with pytest.raises(flumeq.FlumeqError, match=r"(?i)WRONGPASS|authentication"):
        flumeq.Client(f"redis://flumeq-engine:nope@127.0.0.1:{port}/0").stats()


def test_passwords_never_show(acl_server: RedisServer) -> None:
    url = f"redis://flumeq-nobody:hunter2-secret@127.0.0.1:{acl_server.port}/0"
    with pytest.raises(flumeq.FlumeqError) as failure:
        flumeq.Client(url).stats()
    assert "hunter2" not in str(failure.value)
    with pytest.raises(flumeq.ConfigError) as bad:
        flumeq.Client("redis+sentinel://u:hunter2@127.0.0.1:1,127.0.0.1:x/main")
    assert "hunter2" not in str(bad.value) and "***" in str(bad.value)


def run_features_as(engine_url: str, producer_url: str, reader_url: str, counter: str) -> None:
    run_features(producer_url, counter, engine_url=engine_url, reader_url=reader_url)


# --- Sentinel ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    yield group
    group.close()


def test_every_feature_through_sentinel(sentinel: SentinelGroup, counter: str) -> None:
    sentinel.master().flushall()
    run_features(sentinel.url, counter)


def test_killed_dispatcher_reconnects_through_sentinel(
    sentinel: SentinelGroup, counter: str
) -> None:
    """kill -9 of the engine's dispatcher: the one the supervisor starts in
    its place finds the master through the sentinels, and every task runs."""
    master = sentinel.master()
    master.flushall()
    redis.Redis.from_url(counter).flushall()
    infos = flumeq.Client(sentinel.url).enqueue_many([("count", {"n": n}) for n in range(2000)])
    kill_dispatcher_midway(sentinel.url, master, infos, counter)


def kill_dispatcher_midway(
    url: str, server: redis.Redis, infos: list[flumeq.TaskInfo[Any]], counter: str
) -> None:
    """Starts an engine on ``url``, kills its dispatcher with -9 once 200
    tasks ran (found by its read connection on ``server``), waits for its
    replacement, and checks that every task of ``infos`` runs."""
    process, _ = start_engine(url, counter)
    try:
        wait_until(lambda: len(runs(counter)) > 200, timeout=30)
        killed = reader_pid(server)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: reader_pid(server) not in (None, killed), timeout=30)
        ids = {info.id for info in infos}
        wait_until(lambda: ids <= set(runs(counter)), timeout=60)
    finally:
        err = stop_engine(process)
    assert process.returncode == 0, err[-3000:]


def reader_pid(r: redis.Redis) -> Optional[int]:
    """The pid of the engine's dispatcher, from its named read connection."""
    for client in r.client_list():
        name = str(client.get("name", ""))
        if name.startswith("flumeq:") and ":reader:" in name:
            return int(name.rsplit(":", 1)[1])
    return None


def where_they_are(server: redis.Redis, missing: set[str]) -> str:
    """Where the tasks of ``missing`` are on ``server``: in the stream (and
    whose pending entries), delayed or dead; for a failing test's message."""
    stream = "flumeq:{default}:stream"
    found: dict[str, str] = {}
    for entry_id, fields in server.xrange(stream):
        task = fields[b"id"].decode()
        if task in missing:
            found[task] = f"in the stream as {entry_id.decode()}"
    pending = {
        row["message_id"].decode(): row
        for row in server.xpending_range(stream, "flumeq", "-", "+", 100000)
    }
    for task, where in found.items():
        row = pending.get(where.rsplit(" ", 1)[1])
        if row is not None:
            found[task] = (
                f"{where}, pending at {row['consumer'].decode()} for {row['time_since_delivered']} ms"
                f" ({row['times_delivered']} deliveries)"
            )
    for member in server.zrange("flumeq:{default}:delayed", 0, -1):
        text = member.decode(errors="replace")
        for one in missing:
            if one in text:
                found[one] = "delayed"
    for _, fields in server.xrange("flumeq:{default}:dead"):
        task = fields[b"id"].decode()
        if task in missing:
            found[task] = f"dead: {fields.get(b'reason', b'').decode()}"
    groups = server.xinfo_groups(stream)
    consumers = server.xinfo_consumers(stream, "flumeq")
    lines = [f"{len(missing)} never ran; groups {groups}; consumers {consumers}"]
    lines += [f"{task}: {found.get(task, 'nowhere')}" for task in sorted(missing)[:20]]
    return "\n".join(lines)


def test_failover_mid_drain_loses_nothing(sentinel: SentinelGroup, counter: str) -> None:
    """A sentinel killed, then ``SENTINEL FAILOVER`` while an engine drains
    and a producer writes (the last test of this group: it leaves two
    sentinels):
    both carry on against the new master, and every task the old master had
    passed on runs. A task whose ack the old master took in its last moment
    may run twice (at least once); an enqueue it took in that moment may be
    lost with it (Redis replicates asynchronously): the test counts those."""
    master = sentinel.master()
    master.flushall()
    redis.Redis.from_url(counter).flushall()
    client = flumeq.Client(sentinel.url)
    before = client.enqueue_many([("count", {"n": n}) for n in range(3000)])
    master.execute_command("WAIT", 1, 2000)
    during: list[flumeq.TaskInfo[Any]] = []
    failing: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def produce() -> None:
        producer = flumeq.Client(sentinel.url)
        while writing.is_set():
            try:
                during.extend(producer.enqueue_many([("count", {"during": n}) for n in range(20)]))
            except flumeq.FlumeqError as error:
                failing.append(error)
            time.sleep(0.05)

    process, _ = start_engine(sentinel.url, counter)
    thread = threading.Thread(target=produce)
    missing = ""
    try:
        wait_until(lambda: len(runs(counter)) > 300, timeout=30)
        # The first sentinel of the URL (the one every lookup asked) goes
        # away first: the lookups move to the next; two keep the quorum.
        sentinel.sentinels[0].stop()
        thread.start()
        sentinel.failover()
        writing.clear()
        thread.join()
        after = client.enqueue_many([("count", {"n": n}) for n in range(500)])
        ids = {info.id for info in [*before, *after]}
        try:
            wait_until(lambda: ids <= set(runs(counter)), timeout=60)
        except AssertionError:
            gone = ids - set(runs(counter))
            missing = where_they_are(sentinel.master(), gone) + (
                f"\n{len(gone & {info.id for info in before})} of them enqueued before the failover"
            )
            raise
        time.sleep(2.0)
        stats = flumeq.Client(sentinel.url).stats()
        assert (stats["ready"], stats["in_flight"]) == (0, 0)
    finally:
        writing.clear()
        err = stop_engine(process)
        if missing:
            log = "\n".join(line for line in err.splitlines() if "flumeq.cron" not in line)
            pytest.fail(f"{missing}\nthe engine's log:\n{log[-8000:]}")
    seen = runs(counter)
    assert ids <= set(seen)
    lost = [info.id for info in during if info.id not in seen]
    twice = sum(1 for count in seen.values() if count > 1)
    print(
        f"failover: {len(during)} enqueued during it, {len(lost)} of them lost with the old "
        f"master, {len(failing)} enqueue errors; {twice} of {len(seen)} tasks ran twice"
    )
    assert len(during) > 100 and len(lost) <= len(during) // 2
    assert "Traceback" not in err, err[-3000:]


# --- A 3-master Redis Cluster -------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    made = Cluster()
    yield made
    made.close()


def flush_cluster(cluster: Cluster) -> None:
    for port in cluster.ports:
        redis.Redis(port=port).flushall()


def test_every_feature_on_a_three_master_cluster(cluster: Cluster, counter: str) -> None:
    """``redis+cluster://``: every feature, with the scenario's queues on
    different masters (one blocking read per master, writes per slot)."""
    flush_cluster(cluster)
    masters = {cluster.master_of(queue) for queue in ("default", "other", "held")}
    assert len(masters) >= 2, "the scenario's queues should spread over the masters"
    run_features(cluster.url, counter)
    # Each queue's keys live on its own master: the streams are there.
    for queue in ("default", "other"):
        node = redis.Redis(port=cluster.master_of(queue))
        assert node.exists(f"flumeq:{{{queue}}}:stream") or node.keys(f"flumeq:{{{queue}}}:*")


def test_history_and_retention_on_a_three_master_cluster(cluster: Cluster) -> None:
    """Task history and kept summaries with queues on different masters:
    events, their trim and ack scripts, and the summaries stay on each
    queue's slot; every task reaches PostgreSQL."""
    from postgres import PostgresServer, bin_dir  # noqa: PLC0415

    if bin_dir() is None:
        pytest.skip("PostgreSQL is not installed")
    flush_cluster(cluster)
    queues = ("default", "other")
    assert cluster.master_of("default") != cluster.master_of("other")
    with PostgresServer() as postgres:
        client = flumeq.Client(cluster.url, history=True)
        for queue in queues:
            client.enqueue_many([("ok", {"n": n}) for n in range(300)], queue=queue, retention=600)
        client.enqueue("ok", None, queue="other", task_id="later", delay=3600)
        assert client.cancel("later", "other")
        flumeq.Engine(
            {"ok": lambda task: task.payload}, cluster.url, queues=queues, history=postgres.dsn
        ).run(processes=2, burst=True)
        from flumeq.history.sink import Sink  # noqa: PLC0415

        sink = Sink(cluster.url, postgres.dsn, list(queues), consumer="cluster")
        while sink.step():
            pass
        with flumeq.History(postgres.dsn) as history:
            for queue in queues:
                done = history.search(queue=queue, state="succeeded", limit=1000)
                assert len(done) == 300
            cancelled = history.task("later")
            assert cancelled is not None and cancelled["state"] == "cancelled"
            some = history.task(done[0]["task_id"])
            assert some is not None
            assert [e["event"] for e in some["timeline"]] == ["enqueued", "started", "succeeded"]
        [hit] = flumeq.Admin(cluster.url).find_task(done[0]["task_id"])
        assert hit["completed"] and hit["state"] == "done"
    for queue in queues:
        node = redis.Redis(port=cluster.master_of(queue))
        assert node.xlen(f"flumeq:{{{queue}}}:events") == 0
        assert node.hget(f"flumeq:{{{queue}}}:stats", "history_buffered") == b"0"
        assert node.hlen(f"flumeq:{{{queue}}}:completed") == 300


CLUSTER_ENGINE = """
import sys, time
import flumeq
from conftest import process_redis

def slow(task):
    time.sleep(float(sys.argv[3]))
    process_redis(sys.argv[2]).hincrby("runs", task.id, 1)

flumeq.Engine({"count": slow}, sys.argv[1], queues=("default", "other", "held"),
              claim_stale_after=2.0).run(processes=2)
"""


def test_every_feature_on_a_cluster_with_least_privilege_acl_users(
    cluster: Cluster, counter: str
) -> None:
    """The documented ACL plus its cluster lines, on every master: every
    feature runs and no master refused a command."""
    flush_cluster(cluster)
    masters = [redis.Redis(port=port) for port in cluster.ports]
    for master in masters:
        master.execute_command("ACL", "LOG", "RESET")
        for role in ("engine", "producer", "dashboard"):
            master.execute_command("ACL", "SETUSER", f"flumeq-{role}", "reset")
            master.execute_command(
                "ACL", "SETUSER", f"flumeq-{role}", *documented_acl(role).split()
            )
            master.execute_command(
                "ACL", "SETUSER", f"flumeq-{role}", *documented_cluster_acl(role).split()
            )
    nodes = ",".join(f"127.0.0.1:{port}" for port in cluster.ports)

    def url(role: str) -> str:
        return f"redis+cluster://flumeq-{role}:{role}-secret@{nodes}"

    try:
        run_features_as(url("engine"), url("producer"), url("dashboard"), counter)
        denied = {port: master.execute_command("ACL", "LOG") for port, master in
                  zip(cluster.ports, masters)}  # fmt: skip
        assert all(log == [] for log in denied.values()), f"refused: {denied}"
    finally:
        for master in masters:
            for role in ("engine", "producer", "dashboard"):
                master.execute_command("ACL", "DELUSER", f"flumeq-{role}")


def test_killed_engine_is_recovered_on_a_cluster(cluster: Cluster, counter: str) -> None:
    """kill -9 of an engine's process group mid-run on a 3-master cluster,
    and every master's script cache flushed: another engine claims its tasks
    on every master, and every task runs."""
    flush_cluster(cluster)
    client = flumeq.Client(cluster.url)
    infos = [
        info
        for queue in ("default", "other", "held")
        for info in client.enqueue_many([("count", {"n": n}) for n in range(200)], queue=queue)
    ]
    first = spawn_script(CLUSTER_ENGINE, cluster.url, counter, "0.02")
    try:
        wait_until(lambda: len(runs(counter)) > 50, timeout=30)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # And every master forgets its scripts (as after a restart): they are
    # loaded again where each is needed.
    for port in cluster.ports:
        redis.Redis(port=port).script_flush()
    second = spawn_script(CLUSTER_ENGINE, cluster.url, counter, "0.0")
    try:
        ids = {info.id for info in infos}
        wait_until(lambda: ids <= set(runs(counter)), timeout=60)
    finally:
        err = stop_engine(second)
    assert "Traceback" not in err, err[-3000:]


def test_moving_a_queue_slot_mid_drain_loses_nothing(cluster: Cluster, counter: str) -> None:
    """A queue's slot moved to another master by hand (SETSLOT IMPORTING
    and MIGRATING, MIGRATE, SETSLOT NODE, as ``redis-cli --cluster
    reshard`` does) while an engine drains it and a client enqueues: the
    engine and the client follow ASK and MOVED, and wait out TRYAGAIN while
    the slot is half migrated; every task runs."""
    flush_cluster(cluster)
    client = flumeq.Client(cluster.url)
    before = client.enqueue_many([("count", {"n": n}) for n in range(2000)])
    slot = int(redis.Redis(port=cluster.ports[0]).execute_command("CLUSTER", "KEYSLOT", "default"))
    source = cluster.master_of("default")
    target = next(port for port in cluster.ports if port != source)
    process = spawn_script(CLUSTER_ENGINE, cluster.url, counter, "0.001")
    during: list[flumeq.TaskInfo[Any]] = []

    def half_migrated() -> None:
        # The stats, markers and results are on the target already, the
        # stream still on the source: the engine's outcome MULTIs get
        # TRYAGAIN (and wait), the client's enqueues ASK for the counters.
        for _ in range(10):
            during.extend(client.enqueue_many([("count", {"n": n}) for n in range(20)]))
            time.sleep(0.1)

    try:
        wait_until(lambda: len(runs(counter)) > 200, timeout=30)
        moved = cluster.move_slot(slot, target, during=half_migrated)
        assert moved > 1 and cluster.master_of("default") == target
        after = client.enqueue_many([("count", {"n": n}) for n in range(500)])
        ids = {info.id for info in [*before, *during, *after]}
        wait_until(lambda: ids <= set(runs(counter)), timeout=60)
        # And back, with the engine idle on it.
        cluster.move_slot(slot, source)
        last = client.enqueue_many([("count", {"n": n}) for n in range(100)])
        ids |= {info.id for info in last}
        wait_until(lambda: ids <= set(runs(counter)), timeout=60)
        time.sleep(1.0)
        stats = flumeq.Client(cluster.url).stats()
        assert (stats["ready"], stats["in_flight"]) == (0, 0), stats
    finally:
        err = stop_engine(process)
    assert "Traceback" not in err, err[-3000:]


def test_killed_dispatcher_reconnects_on_a_cluster(cluster: Cluster, counter: str) -> None:
    """kill -9 of the engine's dispatcher on a cluster: the one the
    supervisor starts in its place reads the slot map again, connects to
    every master, and every task runs."""
    flush_cluster(cluster)
    redis.Redis.from_url(counter).flushall()
    client = flumeq.Client(cluster.url)
    infos = [
        info
        for queue in ("default", "other")
        for info in client.enqueue_many([("count", {"n": n}) for n in range(1000)], queue=queue)
    ]
    kill_dispatcher_midway(cluster.url, redis.Redis(port=cluster.ports[0]), infos, counter)


def test_stop_is_bounded_when_every_cluster_master_is_gone(counter: str) -> None:
    """Every master of a cluster killed under a running engine, then SIGTERM
    to its process group: it stops within its bound and does not spin."""
    own = Cluster()
    try:
        client = flumeq.Client(own.url)
        for queue in ("default", "other"):
            client.enqueue_many([("count", {"n": n}) for n in range(1500)], queue=queue)
        engine = spawn_script(STRANDED, own.url, counter, "default,other")
        wait_until(lambda: len(runs(counter)) > 50, timeout=30)
        processes = tree(engine.pid)
        for process in own.processes:
            process.stop()
        time.sleep(3.0)  # the engine meets the outage
        stop = sigterm_group(engine, processes)
    finally:
        own.close()
    assert_stopped_in_bound(engine, stop, "every master")


# --- Cluster's rules on one node ---------------------------------------------


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[ClusterNode]:
    node = ClusterNode()
    yield node
    node.close()


def test_every_feature_keeps_cluster_key_rules(cluster_node: ClusterNode, counter: str) -> None:
    """On a cluster-enabled node, every command, MULTI and script flumeq
    sends keeps its keys on one slot and scripts touch only the keys they
    declare: a breach fails there with CROSSSLOT, as on a real Cluster."""
    redis.Redis.from_url(cluster_node.url).flushall()
    run_features(cluster_node.url, counter)


SLOW_ENGINE = """
import sys, time
import flumeq
from conftest import process_redis

def slow(task):
    time.sleep(0.02)
    process_redis(sys.argv[2]).hincrby("runs", task.id, 1)

flumeq.Engine({"count": slow}, sys.argv[1], queues=("default", "other"),
              claim_stale_after=2.0).run(processes=2)
"""


def test_killed_engine_is_recovered_under_cluster_key_rules(
    cluster_node: ClusterNode, counter: str
) -> None:
    """kill -9 of an engine's whole process group mid-run on a
    cluster-enabled node: another engine claims its tasks (XPENDING and
    XCLAIM per queue) and every task runs."""
    redis.Redis.from_url(cluster_node.url).flushall()
    client = flumeq.Client(cluster_node.url)
    infos = [
        *client.enqueue_many([("count", {"n": n}) for n in range(300)]),
        *client.enqueue_many([("count", {"n": n}) for n in range(300)], queue="other"),
    ]
    first = spawn_script(SLOW_ENGINE, cluster_node.url, counter)
    try:
        wait_until(lambda: len(runs(counter)) > 50, timeout=30)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    second = spawn_script(SLOW_ENGINE, cluster_node.url, counter)
    try:
        ids = {info.id for info in infos}
        wait_until(lambda: ids <= set(runs(counter)), timeout=60)
    finally:
        err = stop_engine(second)
    assert "CROSSSLOT" not in err and "Traceback" not in err, err[-3000:]


STRANDED = """
import sys, time
import flumeq
from conftest import process_redis

def slow(task):
    time.sleep(0.02)
    process_redis(sys.argv[2]).hincrby("runs", task.id, 1)

queues = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("default",)
flumeq.Engine({"count": slow}, sys.argv[1], queues=queues, shutdown_timeout=2.0).run(processes=2)
"""


def test_stop_is_bounded_when_sentinels_and_servers_are_all_gone(counter: str) -> None:
    """Every sentinel, the master and the replica killed under a running
    engine, then SIGTERM to its process group: it stops within its bound
    and does not spin while it waits."""
    group = SentinelGroup()
    try:
        flumeq.Client(group.url).enqueue_many([("count", {"n": n}) for n in range(3000)])
        engine = spawn_script(STRANDED, group.url, counter)
        wait_until(lambda: len(runs(counter)) > 50, timeout=30)
        processes = tree(engine.pid)
        for process in [*group.sentinels, *group.servers]:
            process.stop()
        time.sleep(3.0)  # the engine meets the outage and its lookups fail
        stop = sigterm_group(engine, processes)
    finally:
        group.close()
    assert_stopped_in_bound(engine, stop, "every server")


# --- A unix socket -------------------------------------------------------------


def test_every_feature_over_a_unix_socket(tmp_path: Path, counter: str) -> None:
    socket_path = tmp_path / "redis.sock"
    server = Process(
        tmp_path / "server",
        ["--port", "0", "--unixsocket", str(socket_path), "--save", "", "--appendonly", "no",
         "--dir", ".", "--logfile", "log"],
        0,
    )  # fmt: skip
    try:
        wait_until(socket_path.exists, timeout=10)
        run_features(f"unix://{socket_path}?db=0", counter)
    finally:
        server.stop()
