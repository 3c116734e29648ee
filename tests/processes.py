"""Real consumer processes and real broker nodes, for the tests that drive them.

``python -m strictconsume`` runs as a child process (``Harness.start``); its handler
records the ids it finished in files (see ``tests/framework/process_app.py``), which
``Consumer.finished`` reads back. The broker's side is read with pika (the oracle)
and ``scripts/dev-broker ctl``. Everything here is synchronous: these helpers drive
processes, and no event loop runs in them.

The fixtures ``harness`` and ``own_node`` (tests/conftest.py) build on this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import attrs
import pika

from .amqp.oracle import Oracle
from .conftest import REPO, dev_broker, external_broker_url

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
        # without the query: pika refuses parameters of ours it does not know
        # (``connection_timeout``), and it needs none of them to delete a queue
        for url in {used.split("?", 1)[0] for used in self.urls_used}:
            for queue in (self.queue, f"{self.queue}.dlq"):
                # a private node already stopped: its queues went with it
                with contextlib.suppress(pika.exceptions.AMQPConnectionError):
                    Oracle(url).delete_now(queue)


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


def list_queues(node: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(ready, unacked) of every queue on ``node``, by one ``rabbitmqctl list_queues``
    (about a second: the CLI starts an Erlang VM)."""
    result = dev_broker(
        *node, "ctl", "list_queues", "name", "messages_ready", "messages_unacknowledged"
    )
    found: dict[str, tuple[int, int]] = {}
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            found[fields[0]] = (int(fields[1]), int(fields[2]))
    return found


def list_queue(node: Sequence[str], queue: str) -> tuple[int, int] | None:
    """(ready, unacked) of ``queue`` by ``rabbitmqctl list_queues`` on ``node``."""
    return list_queues(node).get(queue)


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


def url_with(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    vhost: str | None = None,
    port: int | None = None,
) -> str:
    """``url`` with another user, password or vhost, or with 127.0.0.1:``port`` as its
    address; the rest as it was."""
    parts = urllib.parse.urlsplit(url)
    user = user if user is not None else urllib.parse.unquote(parts.username or "guest")
    secret = password if password is not None else urllib.parse.unquote(parts.password or "")
    if port is None:
        host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    else:
        host = f"127.0.0.1:{port}"
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
