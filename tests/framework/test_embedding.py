"""An App embedded in a web service: the examples served by real ASGI servers.

``examples/web_fastapi.py`` runs under uvicorn (asyncio); ``examples/web_trio.py``
under hypercorn with its trio worker and with its asyncio worker. Each server runs as
a subprocess on a free loopback port, against the real broker, consuming a queue of
its own (``WEB_EXAMPLE_QUEUE``); the tests talk to it over HTTP (httpx), publish and
inspect the queue with pika (the oracle), and read ``WEB_EXAMPLE_DONE_FILE``, where the
handler appends the id of every order it finished (fsync'ed, so it is there whatever
happens to the process afterwards).

What is checked:

- an order POSTed over HTTP is published through ``app.publisher()`` and handled by
  the consumer in the same process; a message published with pika is handled too;
- SIGTERM while an order is in flight: the server leaves the ASGI lifespan, the App
  lets the handler finish within the grace period, acks it and closes; the server
  exits, nothing is left on the queue, and the log has no traceback;
- SIGTERM with a grace period shorter than the handler: the order is requeued;
- a broker that refuses the login: the lifespan fails and the server exits instead of
  serving without its consumers (hypercorn then exits 0: an xfail, see below).

uvicorn re-raises the signal once it has shut down gracefully (with the default
handler restored), so it exits "killed by SIGTERM" (-15 here, 143 in a shell);
hypercorn's supervising process turns SIGTERM into a shutdown of its worker and exits
0. Hypercorn runs its app in a spawned worker process, so every server is started in
a session of its own and the whole group is killed if a test leaves it running.

These tests are synchronous: the async work, on trio and on asyncio, happens in the
servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import attrs
import httpx
import pika
import pytest

import strictconsume as sc
from strictconsume._retry import dead_letter_queue_name, retry_queue_name

from ..amqp.oracle import pika_channel
from ..conftest import REPO
from ..processes import url_with

pytestmark = pytest.mark.broker


@attrs.frozen
class Server:
    """How to serve one of the examples."""

    program: Literal["uvicorn", "hypercorn"]
    worker: Literal["asyncio", "trio"]

    @property
    def name(self) -> str:
        return f"{self.program}-{self.worker}"

    @property
    def sigterm_exit_code(self) -> int:
        if self.program == "uvicorn":
            # Since 0.29 (Kludex/uvicorn#1600) uvicorn restores the default handler and
            # raises the signal again once it has shut down: "killed by SIGTERM".
            return -signal.SIGTERM
        return 0  # hypercorn's supervising process turns SIGTERM into a clean stop

    def argv(self, port: int) -> list[str]:
        if self.program == "uvicorn":
            return [
                *("-m", "uvicorn", "examples.web_fastapi:api"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ]
        return [
            *("-m", "hypercorn", "--worker-class", self.worker),
            *("--bind", f"127.0.0.1:{port}", "examples.web_trio:api"),
        ]


SERVERS = [
    Server("uvicorn", "asyncio"),
    Server("hypercorn", "trio"),
    Server("hypercorn", "asyncio"),
]
SERVER = pytest.mark.parametrize("server", SERVERS, ids=[s.name for s in SERVERS])

# hypercorn 0.18's run() takes the exit code of a worker that failed, then overwrites it
# with that of a second _join_exited() over the (by then empty) list of workers: 0
# (pgjones/hypercorn#269, fix proposed in pgjones/hypercorn#372).
HYPERCORN_EXIT_CODE = "hypercorn exits 0 whatever its worker's exit code (hypercorn#269)"

# Both examples use the default retry policy, so these are the queues the App declares.
RETRY_DELAYS = sc.Retry().delays


# -- the server ------------------------------------------------------------------------


@attrs.define
class Service:
    """One server process, its HTTP client, and what it left behind."""

    server: Server
    proc: subprocess.Popen[bytes]
    log_path: Path
    done_path: Path
    client: httpx.Client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def done(self) -> list[str]:
        """The ids the handler finished, in order (the done file)."""
        if not self.done_path.exists():
            return []
        return self.done_path.read_text().split()

    def _check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.server.name} exited ({self.proc.returncode}) while waiting for "
                f"{what}; its log:\n{self.tail()}"
            )

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``condition`` until it holds; returns when it did (time.monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return time.monotonic()
            self._check_alive(what)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {what} within {timeout:g} s; the {self.server.name} log:\n{self.tail()}"
                )
            time.sleep(0.02)

    def wait_serving(self, timeout: float = 20) -> float:
        """Wait until the server answers HTTP: it does so only once the lifespan has
        started, so once the App is consuming."""

        def answers() -> bool:
            try:
                return self.client.get("/orders/-").status_code == 404
            except httpx.TransportError:
                return False

        return self.wait_for(answers, timeout, "HTTP service")

    def post(self, order: dict[str, Any], timeout: float = 5) -> httpx.Response:
        return self.client.post("/orders", json=order, timeout=timeout)

    def state(self, order_id: str) -> str | None:
        response = self.client.get(f"/orders/{order_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body = response.json()
        assert body["id"] == order_id, body
        return str(body["state"])

    def wait_for_state(self, order_id: str, state: str, timeout: float = 20) -> float:
        return self.wait_for(
            lambda: self.state(order_id) == state, timeout, f"order {order_id} {state}"
        )

    def terminate(self, timeout: float) -> tuple[int, float, float]:
        """SIGTERM, then wait for the exit: (exit code, when sent, when exited)."""
        self.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.server.name} did not exit within {timeout:g} s of SIGTERM; "
                f"its log:\n{self.tail()}"
            ) from None
        return code, signalled, time.monotonic()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Harness:
    """A unique queue, the servers of one test, and their cleanup."""

    url: str
    queue: str
    directory: Path
    services: list[Service] = attrs.Factory(list)

    def start(
        self, server: Server, env: dict[str, str] | None = None, url: str | None = None
    ) -> Service:
        n = len(self.services)
        port = free_port()
        log_path = self.directory / f"{server.name}-{n}.log"
        done_path = self.directory / f"done-{n}.txt"
        environ = {
            **os.environ,
            "STRICTCONSUME_URL": url or self.url,
            "WEB_EXAMPLE_QUEUE": self.queue,
            "WEB_EXAMPLE_DONE_FILE": str(done_path),
            **(env or {}),
        }
        environ.pop("AMQP_URL", None)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *server.argv(port)],
                cwd=REPO,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # hypercorn's worker is a process of its own
            )
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
        service = Service(server, proc, log_path, done_path, client)
        self.services.append(service)
        return service

    def close(self) -> None:
        for service in self.services:
            service.client.close()
            if service.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.proc.pid, signal.SIGKILL)
            service.proc.wait(timeout=30)
        queues = [
            self.queue,
            dead_letter_queue_name(self.queue),
            *(retry_queue_name(self.queue, delay) for delay in RETRY_DELAYS),
        ]
        with pika_channel(self.url) as ch:
            for queue in queues:
                ch.queue_delete(queue)


@pytest.fixture
def harness(broker_url: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(broker_url, f"test-embedding-{uuid.uuid4().hex}", tmp_path)
    try:
        yield h
    finally:
        h.close()


# -- the broker's side -----------------------------------------------------------------


def publish(url: str, queue: str, order: dict[str, Any]) -> None:
    """Publish ``order`` as JSON to ``queue`` with pika (persistent, confirmed)."""
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        ch.basic_publish(
            "",
            queue,
            json.dumps(order).encode(),
            pika.BasicProperties(delivery_mode=2, message_id=str(order["id"])),
            mandatory=True,
        )


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``: a passive declare."""
    with pika_channel(url) as ch:
        method = ch.queue_declare(queue, passive=True).method
        return int(method.message_count), int(method.consumer_count)


def counts_after_settling(url: str, queue: str, seconds: float = 1.0) -> tuple[int, int]:
    """The counts of ``queue`` once they stayed the same for ``seconds``: a requeue by
    a closed channel reaches the queue asynchronously."""
    last = queue_counts(url, queue)
    stable_since = time.monotonic()
    deadline = stable_since + 10
    while time.monotonic() - stable_since < seconds and time.monotonic() < deadline:
        time.sleep(0.05)
        counts = queue_counts(url, queue)
        if counts != last:
            last, stable_since = counts, time.monotonic()
    return last


def get(url: str, queue: str) -> tuple[dict[str, Any], Any, bool] | None:
    """basic.get with auto-ack: (the JSON body, the properties, redelivered)."""
    with pika_channel(url) as ch:
        method, properties, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return None
        return json.loads(body), properties, bool(method.redelivered)


class PausableProxy:
    """A TCP proxy to the broker whose forwarding (both ways) the test can hold up:
    while paused, what each side sends waits in the proxy."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


# -- the tests -------------------------------------------------------------------------


@SERVER
def test_orders_from_http_and_from_the_broker_are_handled(harness: Harness, server: Server) -> None:
    began = time.monotonic()
    service = harness.start(server)
    serving = service.wait_serving()
    assert queue_counts(harness.url, harness.queue)[1] == 1, "the App is not consuming"

    ready = service.client.get("/consumers/health/ready")  # the App's, mounted
    assert ready.status_code == 200, ready.text
    assert ready.json()["consumers"] == {harness.queue: "subscribed"}
    assert service.client.get("/orders/never-posted").status_code == 404
    assert service.post({"slow": 1}).status_code == 422  # no id: nothing published

    posted = f"http-{uuid.uuid4().hex[:8]}"
    response = service.post({"id": posted})
    assert response.status_code == 202, response.text
    assert response.json()["id"] == posted
    assert response.json()["state"] in ("queued", "processing", "done")
    handled = service.wait_for_state(posted, "done")

    direct = f"pika-{uuid.uuid4().hex[:8]}"
    assert service.state(direct) is None
    published = time.monotonic()
    publish(harness.url, harness.queue, {"id": direct})
    direct_handled = service.wait_for_state(direct, "done")

    # The state is "done" before the handler returns; the ack is counted just after.
    acked = f'strictconsume_messages_total{{outcome="ack",queue="{harness.queue}"}} 2.0'
    deadline = time.monotonic() + 5
    while acked not in (metrics := service.client.get("/consumers/metrics").text):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.02)
    code, signalled, exited = service.terminate(15)
    log = service.log()
    print(
        f"[{server.name}] serving {serving - began:.2f} s after the start; the POSTed order "
        f"done {handled - serving:.2f} s later, the pika one {direct_handled - published:.2f} s "
        f"after its publish; exit {code} {exited - signalled:.2f} s after SIGTERM"
    )
    assert code == server.sigterm_exit_code, log
    assert sorted(service.done()) == sorted([posted, direct])
    assert counts_after_settling(harness.url, harness.queue) == (0, 0)
    assert queue_counts(harness.url, dead_letter_queue_name(harness.queue)) == (0, 0)
    assert "Traceback" not in log, log


@SERVER
def test_sigterm_lets_the_order_in_flight_finish(harness: Harness, server: Server) -> None:
    grace, slow = 10.0, 2.0
    service = harness.start(server, env={"STRICTCONSUME_GRACE_PERIOD": str(grace)})
    service.wait_serving()
    order = f"slow-{uuid.uuid4().hex[:8]}"
    response = service.post({"id": order, "slow": slow})
    assert response.status_code == 202, response.text
    processing = service.wait_for_state(order, "processing", 10)
    assert service.done() == []

    code, signalled, exited = service.terminate(grace + 15)
    log = service.log()
    print(
        f"[{server.name}] exit {code} {exited - signalled:.2f} s after SIGTERM, "
        f"{exited - processing:.2f} s after the {slow:g} s order was seen processing "
        f"(grace {grace:g} s)"
    )
    assert code == server.sigterm_exit_code, log
    assert service.done() == [order], "the order did not finish during the shutdown"
    assert exited - signalled < grace, "the shutdown waited for the whole grace period"
    # Acked before the connection closed: nothing went back to the queue.
    assert counts_after_settling(harness.url, harness.queue) == (0, 0)
    assert queue_counts(harness.url, dead_letter_queue_name(harness.queue)) == (0, 0)
    assert "strictconsume: stopped" in log, log
    assert "Traceback" not in log, log


@SERVER
def test_sigterm_requeues_an_order_that_outlasts_the_grace_period(
    harness: Harness, server: Server
) -> None:
    grace = 0.5
    service = harness.start(server, env={"STRICTCONSUME_GRACE_PERIOD": str(grace)})
    service.wait_serving()
    order = f"slower-{uuid.uuid4().hex[:8]}"
    assert service.post({"id": order, "slow": 60}).status_code == 202
    service.wait_for_state(order, "processing", 10)

    code, signalled, exited = service.terminate(15)
    log = service.log()
    print(
        f"[{server.name}] exit {code} {exited - signalled:.2f} s after SIGTERM (grace {grace:g} s)"
    )
    assert code == server.sigterm_exit_code, log
    assert service.done() == []
    assert counts_after_settling(harness.url, harness.queue) == (1, 0)
    got = get(harness.url, harness.queue)
    assert got is not None
    body, properties, redelivered = got
    assert body["id"] == order
    assert properties.message_id == order
    assert redelivered
    assert queue_counts(harness.url, dead_letter_queue_name(harness.queue)) == (0, 0)
    assert "strictconsume: stopped" in log, log
    assert "Traceback" not in log, log


@SERVER
def test_an_unconfirmed_publish_is_a_503_and_may_still_be_queued(
    harness: Harness, server: Server
) -> None:
    """The examples give a publish 5 s (the App's publisher waits while it
    reconnects); a confirm that does not come in time is a 503, and the order may have
    reached the broker all the same. (A first order opens the App's publishing
    connection, which is made when something first publishes.)"""
    proxy = PausableProxy(harness.url)
    try:
        service = harness.start(server, url=url_with(harness.url, port=proxy.port))
        service.wait_serving()
        first = f"first-{uuid.uuid4().hex[:8]}"
        assert service.post({"id": first}, timeout=20).status_code < 300
        service.wait_for_state(first, "done")
        order = f"held-{uuid.uuid4().hex[:8]}"
        proxy.pause()
        posted = time.monotonic()
        response = service.post({"id": order}, timeout=20)
        answered = time.monotonic()
        assert response.status_code == 503, response.text
        assert 4.5 <= answered - posted < 10
        assert service.state(order) is None
        proxy.resume()
        resumed = time.monotonic()
        handled = service.wait_for_state(order, "done")
        code, _signalled, _exited = service.terminate(15)
    finally:
        proxy.close()
    log = service.log()
    print(
        f"[{server.name}] 503 after {answered - posted:.2f} s; the order was handled "
        f"{handled - resumed:.2f} s after the link resumed"
    )
    assert code == server.sigterm_exit_code, log
    assert service.done() == [first, order]
    assert counts_after_settling(harness.url, harness.queue) == (0, 0)
    assert "Traceback" not in log, log


@pytest.mark.parametrize(
    "server",
    [
        pytest.param(
            server,
            marks=(
                []
                if server.program == "uvicorn"
                else [pytest.mark.xfail(reason=HYPERCORN_EXIT_CODE, raises=AssertionError)]
            ),
        )
        for server in SERVERS
    ],
    ids=[s.name for s in SERVERS],
)
def test_a_refused_login_stops_the_server(harness: Harness, server: Server) -> None:
    """The App cannot start, so the lifespan fails and the server must not serve
    without its consumers: it exits, with an exit code that says so."""
    secret = f"wrong-{uuid.uuid4().hex}"
    began = time.monotonic()
    service = harness.start(server, url=url_with(harness.url, password=secret))
    try:
        code = service.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{server.name} still runs; its log:\n{service.tail()}") from None
    log = service.log()
    print(f"[{server.name}] exit {code} {time.monotonic() - began:.2f} s after the start")
    assert "strictconsume.StartupError" in log, log
    assert "ACCESS_REFUSED" in log, log
    assert secret not in log
    assert code != 0, f"{server.name} exited 0 although its application could not start"
