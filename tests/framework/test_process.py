"""``python -m strictconsume`` as a real process against a real RabbitMQ (design
sections 3, 5 and 7): a graceful shutdown on SIGTERM, a second SIGTERM, fatal
start-up errors and their exit codes, and reconnecting through closed connections
and a broker restart without losing a message.

The process runs ``tests/framework/process_app.py``, which records every message id
its handler finished in a file per process; the broker's state is read with pika
(``tests/amqp/oracle.py``) and ``scripts/dev-broker ctl list_queues``. These tests
are synchronous: they drive processes, and no event loop runs in them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import anyio
import attrs
import httpx
import pika
import pytest

from ..amqp.oracle import Oracle, pika_channel
from ..conftest import REPO, dev_broker, external_broker_url, free_node_port

pytestmark = pytest.mark.broker

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])
APP = "tests.framework.process_app:app"


# -- the process -----------------------------------------------------------------------


@attrs.define
class Consumer:
    """One ``python -m strictconsume`` process and what it left behind."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    record_dir: Path

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_count(self, text: str) -> int:
        return sum(text in line for line in self.log().splitlines())

    def records(self, kind: str) -> list[str]:
        """Every id in ``<pid>.<kind>`` files of the record directory, in file order."""
        ids: list[str] = []
        for path in sorted(self.record_dir.glob(f"*.{kind}")):
            ids.extend(path.read_text().split())
        return ids

    def finished(self) -> list[str]:
        return self.records("finished")

    def started(self) -> list[str]:
        return self.records("started")

    def send(self, signum: signal.Signals) -> float:
        """Send ``signum``; returns when it was sent (time.monotonic)."""
        self.proc.send_signal(signum)
        return time.monotonic()

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Wait for the exit; returns the exit code and when it was seen."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the consumer did not exit within {timeout:g} s; its log:\n{self.tail()}"
            ) from None
        return code, time.monotonic()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``condition`` until it holds; returns when it did (time.monotonic).

        Nothing announces a line in a file or a count on the broker, so this polls;
        a process that exits meanwhile fails at once with its log.
        """
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the consumer exited ({self.proc.returncode}) while waiting for "
                    f"{what}; its log:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {what} within {timeout:g} s; the consumer's log:\n{self.tail()}"
                )
            time.sleep(0.02)


@attrs.define
class Harness:
    """A unique queue, the consumer processes of one test, and their cleanup."""

    url: str
    queue: str
    directory: Path
    procs: list[subprocess.Popen[bytes]] = attrs.Factory(list)
    urls_used: set[str] = attrs.Factory(set)

    def start(
        self,
        backend: str,
        *options: str,
        url: str | None = None,
        env: dict[str, str] | None = None,
        target: str = APP,
    ) -> Consumer:
        url = url or self.url
        self.urls_used.add(url)
        n = len(self.procs)
        record_dir = self.directory / f"records{n}"
        record_dir.mkdir()
        stderr_path = self.directory / f"stderr{n}.log"
        environ = {
            **os.environ,
            "STRICTCONSUME_URL": url,
            "PROCESS_APP_QUEUE": self.queue,
            "PROCESS_APP_RECORD_DIR": str(record_dir),
            **(env or {}),
        }
        environ.pop("AMQP_URL", None)
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "strictconsume", target, "--backend", backend, *options],
                cwd=REPO,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self.procs.append(proc)
        return Consumer(proc, stderr_path, record_dir)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for url in self.urls_used:
            for queue in (self.queue, f"{self.queue}.dlq"):
                # a private node already stopped: its queues went with it
                with contextlib.suppress(pika.exceptions.AMQPConnectionError):
                    Oracle(url).delete_now(queue)


@pytest.fixture
def harness(broker_url: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(broker_url, f"test-process-{uuid.uuid4().hex}", tmp_path)
    try:
        yield h
    finally:
        h.close()


# -- the broker's side -----------------------------------------------------------------


def message_count(url: str, queue: str) -> int:
    """Ready messages in ``queue``, by the oracle."""
    return anyio.run(Oracle(url).message_count, queue)


def settled_count(url: str, queue: str, expected: int, timeout: float = 5.0) -> int:
    """The ready count once it reached ``expected`` (or after ``timeout``): a requeue
    reaches the queue asynchronously (see tests/amqp/test_broker.py)."""
    deadline = time.monotonic() + timeout
    while True:
        count = message_count(url, queue)
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def list_queue(node: Sequence[str], queue: str) -> tuple[int, int] | None:
    """(ready, unacked) of ``queue`` by ``rabbitmqctl list_queues`` on ``node``."""
    result = dev_broker(
        *node, "ctl", "list_queues", "name", "messages_ready", "messages_unacknowledged"
    )
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return None


def unacked_when_settled(node: Sequence[str], queue: str, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = list_queue(node, queue)
        assert found is not None, f"rabbitmqctl does not list queue {queue!r}"
        if found[1] == 0 or time.monotonic() > deadline:
            return found[1]
        time.sleep(0.2)


def publish(url: str, queue: str, messages: Sequence[dict[str, object]]) -> None:
    """Publish each message (JSON, persistent, message_id = its id), confirmed."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = connection.channel()
        ch.confirm_delivery()
        for message in messages:
            ch.basic_publish(
                "",
                queue,
                json.dumps(message).encode(),
                pika.BasicProperties(delivery_mode=2, message_id=str(message["id"])),
                mandatory=True,
            )
    finally:
        connection.close()


def drain(url: str, queue: str) -> list[tuple[str, bool]]:
    """Take every message out of ``queue``: (id, redelivered) each."""
    got: list[tuple[str, bool]] = []
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = connection.channel()
        while True:
            method, _properties, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((str(json.loads(body)["id"]), bool(method.redelivered)))
    finally:
        connection.close()


def declare(url: str, queue: str) -> None:
    """The queue as the App declares it (durable, dead-lettering to ``.dlq``)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = connection.channel()
        ch.queue_declare(f"{queue}.dlq", durable=True)
        ch.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"{queue}.dlq",
            },
        )
    finally:
        connection.close()


SHARED_NODE: tuple[str, ...] = ()  # dev-broker's default node: the session's broker


def ctl_available() -> bool:
    return external_broker_url() is None


# -- 1. shutdown -----------------------------------------------------------------------


@BACKENDS
def test_sigterm_finishes_the_fast_and_requeues_the_slow(harness: Harness, backend: str) -> None:
    grace = 2.0
    consumer = harness.start(
        backend,
        "--prefetch",
        "64",
        "--grace-period",
        str(grace),
        env={"PROCESS_APP_MARK_STARTED": "1"},
    )
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 1, 15, "ready line")
    # Interleaved, so that finished tags sit above the gaps the slow ones leave; the
    # fast ones take 0.2 s to 0.9 s, so some finish before the signal and some in the
    # grace period.
    fast = [f"fast-{i:02d}" for i in range(25)]
    slow = [f"slow-{i:02d}" for i in range(25)]
    messages: list[dict[str, object]] = []
    for i in range(25):
        messages.append({"id": fast[i], "sleep": 0.2 + 0.7 * i / 24})
        messages.append({"id": slow[i], "sleep": 60})
    publish(harness.url, harness.queue, messages)
    consumer.wait_for(lambda: len(consumer.started()) == 50, 10, "50 handlers started")
    finished_before = len(consumer.finished())

    signalled = consumer.send(signal.SIGTERM)
    code, exited = consumer.wait_exit(grace + 5)
    took = exited - signalled
    log = consumer.log()
    print(
        f"[{backend}] exit {code} {took:.2f} s after SIGTERM (grace {grace:g} s); "
        f"{finished_before} fast finished before the signal"
    )

    assert code == 0, log
    assert took <= grace + 5
    assert took >= grace - 0.2, "the slow handlers did not get their grace period"
    finished = consumer.finished()
    assert sorted(finished) == fast, f"finished: {finished}"
    assert settled_count(harness.url, harness.queue, 25) == 25, log
    if ctl_available():
        assert unacked_when_settled(SHARED_NODE, harness.queue) == 0
    back = drain(harness.url, harness.queue)
    assert sorted(i for i, _ in back) == slow
    assert all(redelivered for _, redelivered in back), back
    assert message_count(harness.url, f"{harness.queue}.dlq") == 0
    for line in (
        "SIGTERM received: shutting down",
        f"shutting down: stopping intake; 50 handler(s) running get a grace period of {grace:g} s",
        "handler(s) still running",
        "grace period over; cancelling 25 handler(s)",
        "stopped after handling 50 message(s) (ack 25, retry 0, dead_letter 0, requeue 0, "
        "cancelled 25)",
    ):
        assert line in log, f"{line!r} not in the log:\n{log}"
    assert "Traceback" not in log, log


@BACKENDS
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_skips_the_grace_period(
    harness: Harness, backend: str, signum: signal.Signals
) -> None:
    grace = 30.0
    consumer = harness.start(
        backend,
        "--prefetch",
        "64",
        "--grace-period",
        str(grace),
        env={"PROCESS_APP_MARK_STARTED": "1"},
    )
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 1, 15, "ready line")
    slow = [f"slow-{i:02d}" for i in range(10)]
    publish(harness.url, harness.queue, [{"id": i, "sleep": 60} for i in slow])
    consumer.wait_for(lambda: len(consumer.started()) == 10, 10, "10 handlers started")

    first = consumer.send(signum)
    consumer.wait_for(
        lambda: consumer.log_count("handler(s) still running") == 1, 5, "the grace period"
    )
    second = consumer.send(signum)
    code, exited = consumer.wait_exit(10)
    log = consumer.log()
    print(
        f"[{backend}] exit {code} {exited - second:.2f} s after the second {signum.name}, "
        f"{exited - first:.2f} s after the first (grace {grace:g} s)"
    )

    assert code == 0, log
    assert exited - first < 10, f"the second {signum.name} did not cut the grace period short"
    assert consumer.finished() == []
    assert settled_count(harness.url, harness.queue, 10) == 10, log
    if ctl_available():
        assert unacked_when_settled(SHARED_NODE, harness.queue) == 0
    assert sorted(i for i, _ in drain(harness.url, harness.queue)) == slow
    for line in (
        f"{signum.name} received: shutting down",
        f"{signum.name} again: skipping the grace period",
        "grace period over; cancelling 10 handler(s)",
        "stopped",
    ):
        assert line in log, f"{line!r} not in the log:\n{log}"
    assert "Traceback" not in log, log


@BACKENDS
def test_sigterm_while_the_broker_is_unreachable_exits_at_once(
    harness: Harness, backend: str
) -> None:
    """A refused TCP connection is retried at start-up (it is not fatal), and a stop
    cancels the retrying: exit 0 without waiting for a connection or the grace."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    consumer = harness.start(backend, url=f"amqp://guest:guest@127.0.0.1:{port}/")
    consumer.wait_for(lambda: consumer.log_count("reconnecting") >= 2, 10, "retries")
    signalled = consumer.send(signal.SIGTERM)
    code, exited = consumer.wait_exit(5)
    log = consumer.log()
    print(f"[{backend}] unreachable broker: exit {code} {exited - signalled:.2f} s after SIGTERM")
    assert code == 0, log
    assert exited - signalled < 2
    assert "SIGTERM received: shutting down" in log
    assert "Traceback" not in log, log


# -- 3. fatal start-up -----------------------------------------------------------------


def _with(
    url: str, *, user: str | None = None, password: str | None = None, vhost: str | None = None
) -> str:
    parts = urllib.parse.urlsplit(url)
    user = user if user is not None else urllib.parse.unquote(parts.username or "guest")
    secret = password if password is not None else urllib.parse.unquote(parts.password or "")
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    path = "/" + urllib.parse.quote(vhost, safe="") if vhost is not None else parts.path
    return urllib.parse.urlunsplit(
        (
            parts.scheme,
            f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(secret, safe='')}@{host}",
            path,
            "",
            "",
        )
    )


def _run_to_exit(
    harness: Harness, backend: str, *options: str, target: str = APP, timeout: float = 15
) -> tuple[int, float, str]:
    began = time.monotonic()
    consumer = harness.start(backend, *options, target=target)
    code, exited = consumer.wait_exit(timeout)
    return code, exited - began, consumer.log()


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("strictconsume: error:")]


@BACKENDS
def test_wrong_password_is_fatal_with_one_line_and_no_password(
    harness: Harness, backend: str
) -> None:
    secret = f"wrong-{uuid.uuid4().hex}"
    code, took, log = _run_to_exit(harness, backend, "--url", _with(harness.url, password=secret))
    print(f"[{backend}] wrong password: exit {code} after {took:.2f} s: {_error_lines(log)}")
    assert code == 1, log
    assert took < 10
    assert len(_error_lines(log)) == 1, log
    assert secret not in log
    assert "Traceback" not in log, log


@BACKENDS
def test_unknown_vhost_is_fatal_with_one_line(harness: Harness, backend: str) -> None:
    vhost = f"no-such-vhost-{uuid.uuid4().hex[:8]}"
    url = _with(harness.url, vhost=vhost)
    password = urllib.parse.unquote(urllib.parse.urlsplit(url).password or "")
    code, took, log = _run_to_exit(harness, backend, "--url", url)
    print(f"[{backend}] unknown vhost: exit {code} after {took:.2f} s: {_error_lines(log)}")
    assert code == 1, log
    assert took < 10
    errors = _error_lines(log)
    assert len(errors) == 1, log
    assert vhost in errors[0]
    assert f":{password}@" not in log
    assert "Traceback" not in log, log


@BACKENDS
@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:{secret}@127.0.0.1:notaport/",
        "http://guest:{secret}@127.0.0.1:5673/",
        "amqp://guest:{secret}@127.0.0.1:5673/a/b",
    ],
    ids=["port", "scheme", "vhost-path"],
)
def test_a_malformed_url_is_fatal_with_one_line_and_no_password(
    harness: Harness, backend: str, url: str
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    code, took, log = _run_to_exit(harness, backend, "--url", url.format(secret=secret))
    assert code == 1, log
    assert took < 10
    assert len(_error_lines(log)) == 1, log
    assert secret not in log
    assert "Traceback" not in log, log


@BACKENDS
@pytest.mark.parametrize(
    "target",
    ["tests.framework.no_such_module:app", "tests.framework.process_app:no_such_app"],
)
def test_a_target_that_cannot_be_loaded_is_a_usage_error(
    harness: Harness, backend: str, target: str
) -> None:
    code, _took, log = _run_to_exit(harness, backend, target=target)
    assert code == 2, log
    assert len(_error_lines(log)) == 1, log
    assert "Traceback" not in log, log


# -- 4. reconnect ----------------------------------------------------------------------


@attrs.frozen
class Node:
    name: str
    port: int

    @property
    def args(self) -> tuple[str, ...]:
        return ("--name", self.name, "--port", str(self.port))

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


@pytest.fixture
def own_node() -> Iterator[Node]:
    """A private node of our own, to close connections on and restart; always stopped."""
    if external_broker_url() is not None:
        pytest.skip("restarts a private node; the broker comes from STRICTCONSUME_URL")
    node = Node(f"proc{uuid.uuid4().hex[:8]}", free_node_port())
    try:
        dev_broker(*node.args, "start")
        yield node
    finally:
        dev_broker(*node.args, "stop", check=False)
        shutil.rmtree(REPO / ".broker" / node.name, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
@BACKENDS
def test_reconnects_through_closed_connections_and_a_restart(
    own_node: Node, harness: Harness, backend: str
) -> None:
    total = 5000
    url = own_node.url
    ids = [f"m{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(total)]
    declare(url, harness.queue)
    began = time.monotonic()
    publish(url, harness.queue, [{"id": i} for i in ids])
    print(f"[{backend}] published {total} in {time.monotonic() - began:.1f} s")

    consumer = harness.start(
        backend,
        "--prefetch",
        "100",
        "--grace-period",
        "5",
        url=url,
        env={"PROCESS_APP_SLEEP_MAX": "0.4"},
    )

    def ready_lines() -> int:
        return consumer.log_count("ready: consuming")

    consumer.wait_for(lambda: ready_lines() == 1, 15, "ready line")
    recoveries: list[float] = []
    rng = random.Random()
    for k in range(1, 6):
        time.sleep(rng.uniform(0.5, 1.0))
        in_flight_progress = len(consumer.finished())
        closed = time.monotonic()
        dev_broker(*own_node.args, "ctl", "close_all_connections", "test")

        def reconnected(k: int = k) -> bool:
            return ready_lines() == k + 1

        back = consumer.wait_for(reconnected, 40, f"reconnect {k}")
        recoveries.append(back - closed)
        print(
            f"[{backend}] close {k} at {in_flight_progress} finished: ready again "
            f"{back - closed:.2f} s after the close command returned"
        )

    time.sleep(0.5)
    at_restart = len(set(consumer.finished()))
    before = ready_lines()
    stopping = time.monotonic()
    dev_broker(*own_node.args, "stop")
    stopped = time.monotonic()
    dev_broker(*own_node.args, "start")
    started = time.monotonic()
    back = consumer.wait_for(lambda: ready_lines() > before, 60, "the reconnect after a restart")
    print(
        f"[{backend}] restart at {at_restart} finished: stop {stopped - stopping:.1f} s, "
        f"start {started - stopped:.1f} s, ready again {back - started:.2f} s after the "
        f"node was up ({back - stopping:.1f} s after the stop began)"
    )

    consumer.wait_for(lambda: len(set(consumer.finished())) >= total, 90, "every id finished")
    done = time.monotonic()
    finished = consumer.finished()
    counts = collections.Counter(finished)
    duplicates = {i: n for i, n in counts.items() if n > 1}
    log = consumer.log()
    reconnecting = consumer.log_count("reconnecting")
    print(
        f"[{backend}] all {total} finished {done - back:.1f} s after the last reconnect; "
        f"{len(finished)} handler runs, {len(duplicates)} duplicated ids "
        f"({sorted(duplicates.items())[:20]}); {reconnecting} 'reconnecting' lines, "
        f"{ready_lines()} 'ready' lines; {at_restart} finished before the restart"
    )

    assert set(counts) == set(ids), f"unknown or missing ids: {set(ids) ^ set(counts)}"
    found = list_queue(own_node.args, harness.queue)
    deadline = time.monotonic() + 10
    while found != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
        found = list_queue(own_node.args, harness.queue)
    assert found == (0, 0), f"(ready, unacked) = {found}"
    assert message_count(url, harness.queue) == 0
    assert message_count(url, f"{harness.queue}.dlq") == 0
    for bad in ("PRECONDITION_FAILED", "unknown delivery tag", "Traceback", "unexpected error"):
        assert bad not in log, f"{bad!r} in the log:\n{log}"
    assert reconnecting >= 6, log
    assert ready_lines() >= 7, log

    signalled = consumer.send(signal.SIGTERM)
    code, exited = consumer.wait_exit(15)
    print(f"[{backend}] exit {code} {exited - signalled:.2f} s after SIGTERM")
    assert code == 0, consumer.tail()
    assert "stopped" in consumer.tail(5)


# -- observability: JSON logs and --http -----------------------------------------------------


def _json_lines(log: str) -> list[dict[str, object]]:
    """Every line of ``log`` parsed as JSON (the test fails on a line that is not)."""
    lines = []
    for line in log.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{log}") from None
    return lines


def _events(consumer: Consumer) -> list[dict[str, object]]:
    return [line for line in _json_lines(consumer.log()) if "event" in line]


@BACKENDS
def test_json_logs_and_http_endpoints_of_the_cli(
    harness: Harness, backend: str, broker_ctl: None
) -> None:
    user, password = f"sc-cli-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    dev_broker("ctl", "add_user", user, password)
    harness.urls_used.add(harness.url)  # to delete the queues as guest afterwards
    try:
        dev_broker("ctl", "set_permissions", "-p", "/", user, ".*", ".*", ".*")
        url = _with(harness.url, user=user, password=password)
        consumer = harness.start(
            backend, "--http", "127.0.0.1:0", "--log-format", "json", "--grace-period", "5", url=url
        )
        consumer.wait_for(
            lambda: any(e["event"] == "ready" for e in _events(consumer)), 20, "the ready event"
        )
        serving = [e for e in _events(consumer) if e["event"] == "http_serving"]
        assert len(serving) == 1, consumer.log()
        http = str(serving[0]["message"]).rsplit(" ", 1)[1]
        assert http.startswith("http://127.0.0.1:")
        assert httpx.get(f"{http}/health/live").status_code == 200
        assert httpx.get(f"{http}/health/ready").status_code == 200

        publish(harness.url, harness.queue, [{"id": "fine", "sleep": 0}])
        with pika_channel(harness.url) as ch:
            ch.basic_publish(
                "", harness.queue, b"not json", pika.BasicProperties(message_id="garbage")
            )
        consumer.wait_for(
            lambda: any(e["event"] == "message_failed" for e in _events(consumer)),
            10,
            "the failed message's log line",
        )
        consumer.wait_for(lambda: consumer.finished() == ["fine"], 10, "'fine' finished")
        metrics = httpx.get(f"{http}/metrics").text
        assert f'strictconsume_messages_total{{outcome="ack",queue="{harness.queue}"}} 1.0' in (
            metrics
        )
        assert (
            f'strictconsume_messages_total{{outcome="dead_letter",queue="{harness.queue}"}} 1.0'
            in metrics
        )

        consumer.send(signal.SIGTERM)
        code, _ = consumer.wait_exit(20)
        assert code == 0, consumer.log()
        log = consumer.log()
        assert password not in log
        events = _events(consumer)
        names = [e["event"] for e in events]
        for expected in ("connected", "subscribed", "ready", "http_serving", "shutting_down"):
            assert expected in names, names
        assert names[-1] == "stopped", names
        failed = next(e for e in events if e["event"] == "message_failed")
        assert failed["queue"] == harness.queue
        assert failed["message_id"] == "garbage"
        assert failed["outcome"] == "dead_letter"
        assert failed["attempt"] == 1
        assert isinstance(failed["delivery_tag"], int)
        assert isinstance(failed["duration"], float)
        assert str(failed["error"]).startswith("strictconsume.DecodeError: the body of message")
        assert all(line["level"] in ("INFO", "WARNING") for line in _json_lines(log)), log
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{http}/health/live")
    finally:
        dev_broker("ctl", "delete_user", user, check=False)


@BACKENDS
def test_an_http_address_in_use_is_fatal_with_one_line(harness: Harness, backend: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, took, log = _run_to_exit(harness, backend, "--http", f"127.0.0.1:{port}")
    assert code == 1, log
    assert took < 10
    errors = _error_lines(log)
    assert len(errors) == 1, log
    assert f"cannot serve health and metrics on 127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in log, log
