"""Failover across a three-node RabbitMQ cluster (design sections 5 and 9).

``scripts/dev-cluster`` starts three private nodes on loopback and clusters them; the
consumer (``tests/faults/cluster_app.py``: a quorum queue, replicated on every node)
runs as ``python -m strictconsume`` with all three URLs. The node it is connected to
is stopped mid-run; the consumer must reconnect to another node and go on, and the
no-loss invariant must hold: every published id is finished by the handler or sits in
``<queue>.dlq`` with its reason, nothing stays ready or unacked. Duplicates (a handler
that finished before its ack was lost) are counted and printed, not forbidden.

The cluster is started once for the module (about 25 s) and stopped at its end; a
test that stopped a node has it started again before the next test. The last test
runs an App in the test's process: one consumer's queue lives on a node that stops,
and the other consumers must go on (issue 14).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import attrs
import pytest

import strictconsume as sc

from ..amqp.oracle import get_from, pika_channel
from ..conftest import REPO, dev_broker, external_broker_url, free_node_port
from ..framework.polling import wait_until
from ..processes import Consumer, Harness, Node, list_queue, message_count, publish

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEV_CLUSTER = REPO / "scripts" / "dev-cluster"
APP = "tests.faults.cluster_app:app"
SIZE = 3
BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])
#: Log lines that must never appear, whatever the fault.
BAD_LOG = ("Traceback", "unexpected error", "PRECONDITION_FAILED", "unknown delivery tag")


@attrs.frozen
class Cluster:
    """The three nodes of one ``scripts/dev-cluster --name prefix --base-port base``."""

    prefix: str
    base_port: int

    def node(self, n: int) -> Node:
        """Node n (1, 2 or 3) as dev-broker knows it: ``node(n).args`` reach it with
        ``dev_broker`` while ``STRICTCONSUME_BROKER_EPMD_PORT`` is set (see ``whole``)."""
        return Node(f"{self.prefix}-{n}", self.base_port + n - 1)

    @property
    def numbers(self) -> range:
        return range(1, SIZE + 1)

    @property
    def urls(self) -> str:
        return ",".join(self.node(n).url for n in self.numbers)

    @property
    def epmd_port(self) -> int:
        return self.base_port + 10000

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``scripts/dev-cluster`` against this cluster; its output captured."""
        return subprocess.run(
            [
                sys.executable,
                str(DEV_CLUSTER),
                "--name",
                self.prefix,
                "--base-port",
                str(self.base_port),
                *args,
            ],
            capture_output=True,
            text=True,
            check=check,
            timeout=240,
        )

    def stopped_nodes(self) -> list[int]:
        status = self.run("status", check=False).stdout
        return [n for n in self.numbers if f"node {n}: stopped" in status]

    def connection_ports(self, via: int, product: str = "strictconsume") -> list[int]:
        """The server ports (so the nodes) of every connection whose client calls itself
        ``product``, by ``rabbitmqctl list_connections`` on node ``via`` (which lists
        the connections of the whole cluster)."""
        out = self.run(
            "ctl", str(via), "list_connections", "port", "client_properties", "--formatter", "json"
        ).stdout
        ports = []
        for connection in json.loads(out or "[]"):
            properties = {entry[0]: entry[-1] for entry in connection["client_properties"]}
            if properties.get("product") == product:
                ports.append(int(connection["port"]))
        return ports

    def queue_home(self, via: int, queue: str) -> str:
        """The node a queue lives on: a classic queue's pid, a quorum queue's leader."""
        out = self.run("ctl", str(via), "list_queues", "name", "type", "pid", "leader").stdout
        for line in out.splitlines():
            fields = line.split("\t")
            if fields[0] == queue:
                kind, pid, leader = fields[1:4]
                return leader if kind == "quorum" else pid.split(".")[0].strip("<")
        raise AssertionError(f"rabbitmqctl does not list queue {queue!r}:\n{out}")


def _all_free(ports: set[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_cluster_port() -> int:
    """A base port P such that P, P+1, P+2 (AMQP), P+10000 (the shared epmd) and
    P+20000..P+20002 (Erlang distribution) are all free."""
    avoid: set[int] = set()
    for _ in range(50):
        base = free_node_port(avoid)
        siblings = {base + 1, base + 2, base + 20001, base + 20002}
        if base + 2 <= 44000 and _all_free(siblings):
            return base
        avoid |= {base, base + 1, base + 2}
    raise RuntimeError("no three free node ports in a row")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three clustered private nodes for the module; always stopped and removed."""
    if external_broker_url() is not None:
        pytest.skip("starts a private cluster; the broker comes from STRICTCONSUME_URL")
    c = Cluster(f"clu{uuid.uuid4().hex[:6]}", free_cluster_port())
    try:
        began = time.monotonic()
        urls = c.run("start").stdout.strip()
        print(f"\ncluster {c.prefix} started in {time.monotonic() - began:.1f} s: {urls}")
        assert urls == c.urls
        yield c
    finally:
        c.run("stop", check=False)
        for n in c.numbers:
            dev_broker(*c.node(n).args, "purge", check=False)


def start_stopped_nodes(cluster: Cluster) -> None:
    for n in cluster.stopped_nodes():
        began = time.monotonic()
        cluster.run("start-node", str(n))
        print(f"node {n} back in the cluster after {time.monotonic() - began:.1f} s")


@pytest.fixture
def whole(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """The cluster with its three nodes running.

    ``STRICTCONSUME_BROKER_EPMD_PORT`` is set for the test, so that
    ``tests.processes.dev_broker`` (and ``list_queue``) reach every node of it.
    """
    monkeypatch.setenv("STRICTCONSUME_BROKER_EPMD_PORT", str(cluster.epmd_port))
    start_stopped_nodes(cluster)
    return cluster


@pytest.fixture
def cluster_harness(whole: Cluster, tmp_path: Path) -> Iterator[Harness]:
    """A unique queue on the cluster and the consumer processes of one test. Afterwards
    the consumers are killed, a stopped node is started again and the queues are
    deleted."""
    h = Harness(whole.node(1).url, f"test-cluster-{uuid.uuid4().hex}", tmp_path)
    try:
        yield h
    finally:
        for proc in h.procs:  # before the stopped node comes back
            if proc.poll() is None:
                proc.kill()
        start_stopped_nodes(whole)
        h.close()


def ready_lines(consumer: Consumer) -> int:
    return consumer.log_count("ready: consuming")


def declare_through(harness: Harness, backend: str, url: str) -> None:
    """Let the App declare its topology through ``url`` (a single node, so the classic
    ``.dlq`` lives there and the quorum queue's leader starts there), then stop it."""
    consumer = harness.start(backend, url=url, target=APP)
    consumer.wait_for(lambda: ready_lines(consumer) == 1, 30, "the ready line")
    consumer.send(signal.SIGTERM)
    code, _ = consumer.wait_exit(30)
    assert code == 0, consumer.tail()


def log_gap(consumer: Consumer, first: str, then: str) -> float:
    """Seconds between the first log line containing ``first`` and the next one after it
    containing ``then``, by the timestamps the consumer wrote."""
    lines = consumer.log().splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(line for line in lines[start:] if then in line)

    def stamp(line: str) -> float:
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    return stamp(end) - stamp(lines[start])


def dead_letters(url: str, queue: str) -> dict[str, dict[str, object]]:
    """Take every message out of ``queue``: its id and headers."""
    found: dict[str, dict[str, object]] = {}
    with pika_channel(url) as ch:
        while (message := get_from(ch, queue)) is not None:
            found[str(json.loads(message.body)["id"])] = dict(message.headers or {})
    return found


def has_reason(headers: dict[str, object]) -> bool:
    """Dead-lettered by the App (``x-error-type``) or by the broker (``x-death``)."""
    return bool(headers.get("x-error-type") or headers.get("x-death"))


@BACKENDS
@pytest.mark.timeout(360)
def test_consumer_fails_over_when_its_node_stops(
    whole: Cluster, cluster_harness: Harness, backend: str
) -> None:
    """Stopping the node the consumer is connected to (which also leads its quorum
    queue) mid-run loses nothing: the consumer reconnects to another URL, the queue
    gets a leader on a surviving node, the consumer goes on there, every id ends
    finished (or dead-lettered with a reason) and the queue is left with nothing ready
    or unacked.

    The classic ``.dlq`` is placed on node 3 beforehand, so that stopping node 1 does
    not take it away (see ``test_failover_when_the_dead_letter_queue_node_stops``).
    """
    cluster, harness = whole, cluster_harness
    total = 2000
    queue, dlq = harness.queue, f"{harness.queue}.dlq"
    declare_through(harness, backend, cluster.node(3).url)  # .dlq on node 3
    with pika_channel(cluster.node(2).url) as ch:
        ch.queue_delete(queue)  # so that the next declaration puts the leader on node 1
    declare_through(harness, backend, cluster.node(1).url)
    assert cluster.queue_home(2, dlq) == f"strictconsume-{cluster.node(3).name}@localhost"
    assert cluster.queue_home(2, queue) == f"strictconsume-{cluster.node(1).name}@localhost"

    ids = [f"c{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(total)]
    began = time.monotonic()
    publish(cluster.node(2).url, queue, [{"id": i} for i in ids])
    print(f"\n[{backend}] published {total} to node 2 in {time.monotonic() - began:.1f} s")

    consumer = harness.start(
        backend,
        "--prefetch",
        "20",
        "--grace-period",
        "5",
        env={"STRICTCONSUME_URL": cluster.urls, "PROCESS_APP_SLEEP_MAX": "0.2"},
        target=APP,
    )
    consumer.wait_for(lambda: ready_lines(consumer) == 1, 30, "the ready line")
    ports = cluster.connection_ports(via=2)
    assert len(ports) == 1, f"the consumer's connections are on ports {ports}"
    victim = ports[0] - cluster.base_port + 1
    assert victim != 3, "the consumer is connected to the node that holds the .dlq"
    survivor = next(n for n in cluster.numbers if n not in (victim, 3))

    consumer.wait_for(lambda: len(consumer.finished()) >= total // 4, 60, "a quarter finished")
    at_stop = len(set(consumer.finished()))
    assert at_stop < total, "everything was finished before the node was stopped"
    stopping = time.monotonic()
    cluster.run("stop-node", str(victim))
    stopped = time.monotonic()
    back = consumer.wait_for(lambda: ready_lines(consumer) >= 2, 60, "ready on another node")
    at_ready = len(set(consumer.finished()))
    ports_after = cluster.connection_ports(via=survivor)
    print(
        f"[{backend}] stopped node {victim} at {at_stop}/{total} finished (the stop took "
        f"{stopped - stopping:.1f} s); ready again {back - stopping:.2f} s after the stop "
        f"began, on port(s) {ports_after}; by the consumer's log, "
        f"{log_gap(consumer, 'connection lost', 'ready: consuming'):.2f} s from "
        "'connection lost' to 'ready'"
    )
    assert ports_after, "the consumer has no connection after the failover"
    assert cluster.node(victim).port not in ports_after
    leader = cluster.queue_home(survivor, queue)
    assert leader != f"strictconsume-{cluster.node(victim).name}@localhost", leader

    dlq_seen = [0.0]

    def settled() -> bool:
        finished = len(set(consumer.finished()))
        if finished >= total:
            return True
        if time.monotonic() - dlq_seen[0] < 1.0:  # the broker is asked once a second
            return False
        dlq_seen[0] = time.monotonic()
        return finished + message_count(cluster.node(survivor).url, dlq) >= total

    done = consumer.wait_for(settled, 120, "every id finished or dead-lettered")
    finished = consumer.finished()
    counts = collections.Counter(finished)
    duplicates = {i: n for i, n in counts.items() if n > 1}
    dead = dead_letters(cluster.node(survivor).url, dlq)
    lost = set(ids) - set(counts) - set(dead)
    log = consumer.log()
    print(
        f"[{backend}] all settled {done - back:.1f} s after the failover: {len(finished)} "
        f"handler runs, {len(duplicates)} duplicated ids, {len(dead)} dead-lettered, "
        f"lost {len(lost)}; {consumer.log_count('reconnecting')} 'reconnecting' lines"
    )

    assert not lost, f"lost ids: {sorted(lost)[:20]}"
    assert len(set(counts)) > at_ready, "nothing was finished after the failover"
    assert set(counts) | set(dead) == set(ids), "ids that were never published"
    assert all(has_reason(headers) for headers in dead.values()), dead
    found = list_queue(cluster.node(survivor).args, queue)
    deadline = time.monotonic() + 10
    while found != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
        found = list_queue(cluster.node(survivor).args, queue)
    assert found == (0, 0), f"(ready, unacked) = {found}"
    for bad in BAD_LOG:
        assert bad not in log, f"{bad!r} in the log:\n{log}"

    signalled = consumer.send(signal.SIGTERM)
    code, exited = consumer.wait_exit(15)
    print(f"[{backend}] exit {code} {exited - signalled:.2f} s after SIGTERM")
    assert code == 0, consumer.tail()


class NotReadyAgain(AssertionError):
    """The consumer did not subscribe again after a node of the cluster stopped."""


@pytest.mark.timeout(240)
def test_failover_when_the_dead_letter_queue_node_stops(
    whole: Cluster, cluster_harness: Harness
) -> None:
    """A quorum consumer declares its topology through node 1 (where its ``.dlq``
    lands) and is connected there; stopping node 1 must not stop it: it is ready again
    on node 2 or 3 within 20 s. One backend: the declaration does not depend on it."""
    cluster, harness = whole, cluster_harness
    consumer = harness.start("trio", env={"STRICTCONSUME_URL": cluster.urls}, target=APP)
    consumer.wait_for(lambda: ready_lines(consumer) == 1, 30, "the ready line")
    node1 = f"strictconsume-{cluster.node(1).name}@localhost"
    assert cluster.queue_home(2, f"{harness.queue}.dlq") == node1
    assert cluster.connection_ports(via=2) == [cluster.node(1).port]

    stopping = time.monotonic()
    cluster.run("stop-node", "1")
    with contextlib.suppress(AssertionError):
        consumer.wait_for(lambda: ready_lines(consumer) >= 2, 20, "ready on another node")
    print(
        f"\n[trio] {time.monotonic() - stopping:.1f} s after stopping node 1: "
        f"{ready_lines(consumer)} ready line(s), "
        f"{consumer.log_count('404 NOT_FOUND')} declarations refused with 404"
    )
    if ready_lines(consumer) < 2:
        raise NotReadyAgain(consumer.tail())


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_a_queue_whose_home_node_is_down_does_not_stop_the_other_consumers(
    anyio_backend: str, whole: Cluster
) -> None:
    """Two consumers, connected to node 1: ``orders``, a classic queue that lives on
    node 1, and ``invoices``, a quorum queue on every node. Node 1 stops: the App
    reconnects to node 2, where ``orders`` cannot be declared (404: its home node is
    down). ``invoices`` must subscribe and work meanwhile, ``orders`` retry with
    backoff (readiness names it), and subscribe again once node 1 is back; nothing is
    lost. Before, the one 404 ended every session and the App reconnected for ever
    with no consumer working. (A classic queue: its 404 is what RabbitMQ answers for
    a queue whose home node is down.)"""
    cluster = whole
    tag = uuid.uuid4().hex[:8]
    orders, invoices = f"test-home-{tag}-orders", f"test-home-{tag}-invoices"
    handled: dict[str, list[str]] = {orders: [], invoices: []}
    node1 = f"strictconsume-{cluster.node(1).name}@localhost"
    url2 = cluster.node(2).url
    app = sc.App(url=[cluster.node(n).url for n in cluster.numbers], grace_period=2.0)

    @app.consumer(orders, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle_orders(msg: sc.Message) -> None:
        handled[orders].append(str(msg.json()["id"]))

    @app.consumer(invoices, queue_type="quorum", retry=sc.Retry(delays=()), timeout=5.0)
    async def handle_invoices(msg: sc.Message) -> None:
        handled[invoices].append(str(msg.json()["id"]))

    async def until(what: str, within: float, condition: Callable[[], bool]) -> float:
        began = time.monotonic()

        async def holds() -> bool:
            return condition()

        await wait_until(holds, within=within, what=what)
        return time.monotonic() - began

    async def ctl(*args: str) -> None:
        await anyio.to_thread.run_sync(functools.partial(cluster.run, *args))

    def publish_to(queue: str, *ids: str) -> Awaitable[None]:
        messages: list[dict[str, object]] = [{"id": i} for i in ids]
        return anyio.to_thread.run_sync(publish, url2, queue, messages)

    try:
        async with app.running():
            assert cluster.queue_home(2, orders) == node1
            assert cluster.connection_ports(via=2) == [cluster.node(1).port]
            await publish_to(orders, "o1")
            await publish_to(invoices, "i1")
            await until("both handled", 20, lambda: handled == {orders: ["o1"], invoices: ["i1"]})

            await ctl("stop-node", "1")
            back = await until("invoices subscribed again", 60, lambda: app.subscriptions[invoices])
            await publish_to(invoices, *(f"i{n}" for n in range(2, 12)))
            await until("invoices handled", 30, lambda: len(handled[invoices]) == 11)
            # orders is still refused, and named: the App is not ready
            during = dict(app.subscriptions)
            ready_during = app.ready
            reconnects = app.reconnects

            await ctl("start-node", "1")
            again = await until("orders subscribed again", 90, lambda: app.ready)
            await publish_to(orders, "o2")
            await until("orders handled", 20, lambda: handled[orders] == ["o1", "o2"])
            print(
                f"\n[{anyio_backend}] invoices subscribed again {back:.1f} s after node 1 "
                f"stopped; orders {again:.1f} s after it started again; "
                f"{reconnects} reconnect(s)"
            )
    finally:
        await anyio.to_thread.run_sync(start_stopped_nodes, cluster)
        with pika_channel(url2) as ch:
            for name in (orders, f"{orders}.dlq", invoices, f"{invoices}.dlq"):
                ch.queue_delete(name)
    assert during == {orders: False, invoices: True}
    assert ready_during is False
    assert reconnects == 1  # one reconnect for the lost node; none for the 404s
    # each exactly once; handlers run as tasks of their own, so in any order (trio
    # shuffles its run queue)
    assert sorted(handled[invoices], key=lambda i: int(i[1:])) == [f"i{n}" for n in range(1, 12)]
