"""Health, metrics and logs (design section 7, issue "living in production").

Without sockets: the address and settings parsing, the histogram, the ASGI app called
directly, the Prometheus rendering parsed back with prometheus-client's own parser,
and the JSON log format. Against the real broker: an App serving ``--http`` with
hypercorn on trio and on asyncio, scraped with httpx after messages of each outcome,
and ``/health/ready`` turning 503 while the App cannot reconnect (its user's
permissions revoked and its connection closed) and 200 again once it can.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import uuid
from collections.abc import Iterator, MutableMapping
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

import strictconsume as sc
from strictconsume._cli import JSONFormatter
from strictconsume._http import HttpServer, asgi_app, parse_address
from strictconsume._metrics import HANDLER_BUCKETS, Histogram
from strictconsume._outcome import OutcomeKind
from strictconsume._settings import resolve_settings

from ..amqp.oracle import Oracle
from ..conftest import dev_broker, external_broker_url
from .polling import DEADLINE, wait_until

# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        (":9000", ("0.0.0.0", 9000)),
        ("[::1]:0", ("::1", 0)),
        (" localhost:65535 ", ("localhost", 65535)),
    ],
)
def test_http_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9000", "host:", "host:x", "h:65536", "h:-1", "h:²"])
def test_http_address_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|0 to 65535"):
        parse_address(text)


def test_http_setting_from_code_environment_and_command_line() -> None:
    assert resolve_settings({}, {}).http is None
    assert resolve_settings({"http": ":1"}, {}).http == ":1"
    settings = resolve_settings({"http": ":1"}, {"STRICTCONSUME_HTTP": "127.0.0.1:2"})
    assert settings.http == "127.0.0.1:2"
    assert resolve_settings({}, {"STRICTCONSUME_HTTP": ":2"}, {"http": ":3"}).http == ":3"
    with pytest.raises(sc.SettingsError, match=r"STRICTCONSUME_HTTP.*'nine'.*HOST:PORT"):
        resolve_settings({}, {"STRICTCONSUME_HTTP": "nine"})


# -- the histogram ----------------------------------------------------------------------


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    histogram = Histogram()
    for value in (0.0, 0.005, 0.0051, 1.0, 299.0, 301.0):
        histogram.observe(value)
    cumulative = dict(histogram.cumulative())
    assert cumulative[0.005] == 2  # 0.0 and 0.005: le means <=
    assert cumulative[0.01] == 3
    assert cumulative[1.0] == 4
    assert cumulative[300.0] == 5
    assert cumulative[math.inf] == 6 == histogram.count
    assert histogram.total == pytest.approx(0.005 + 0.0051 + 1.0 + 299.0 + 301.0)
    counts = [count for _, count in histogram.cumulative()]
    assert counts == sorted(counts)
    assert [bound for bound, _ in histogram.cumulative()] == list(HANDLER_BUCKETS)


# -- the ASGI app, called directly -------------------------------------------------------


def _app_with_queues(*queues: str) -> sc.App:
    app = sc.App(url="amqp://guest:guest@127.0.0.1:1/")
    for queue in queues:
        app.consumer(queue, timeout=1.0)(_handler())
    return app


def _handler() -> Any:
    async def handle(msg: sc.Message) -> None:
        pass

    return handle


async def call(
    asgi: Any, path: str, method: str = "GET", root_path: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request through the ASGI interface, as a server would make it."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": root_path + path,
        "root_path": root_path,
        "headers": [],
    }
    await asgi(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    body = sent[1]["body"]
    assert headers["content-length"] == str(len(body)) or method == "HEAD"
    return sent[0]["status"], headers, body


def families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name (as exposed) -> {sorted labels: value}, by prometheus-client's parser."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.mark.anyio
async def test_asgi_routes_of_an_app_that_is_not_running() -> None:
    app = _app_with_queues("q1")
    asgi = app.asgi()
    status, headers, body = await call(asgi, "/health/live")
    assert (status, json.loads(body)) == (503, {"status": "unavailable", "running": False})
    assert headers["content-type"] == "application/json"
    status, _, body = await call(asgi, "/health/ready")
    assert status == 503
    assert json.loads(body) == {
        "status": "unavailable",
        "connected": False,
        "consumers": {"q1": "not subscribed"},
    }
    assert (await call(asgi, "/nowhere"))[0] == 404
    assert (await call(asgi, "/metrics", method="POST"))[0] == 405
    status, headers, body = await call(asgi, "/metrics", method="HEAD")
    assert (status, body) == (200, b"")
    # mounted under a prefix (Starlette's Mount sets root_path)
    status, _, body = await call(asgi, "/metrics", root_path="/consumers")
    assert status == 200
    assert b"strictconsume_connected 0.0" in body


@pytest.mark.anyio
async def test_metrics_render_the_design_names_and_values() -> None:
    app = _app_with_queues("q1", "q2")
    app.metrics.add_queues(["q1", "q2"])
    app._record("q1", OutcomeKind.ACK, 0.003)
    app._record("q1", OutcomeKind.ACK, 0.2)
    app._record("q1", OutcomeKind.RETRY, 0.02)
    app._record("q2", OutcomeKind.DEAD_LETTER, 2.0)
    app.metrics.reconnects = 3
    app._consumer_timed_out("q2")
    status, headers, body = await call(app.asgi(), "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    found = families(body.decode())
    messages = found["strictconsume_messages_total"]
    assert messages == {
        (("outcome", kind.value), ("queue", queue)): float(
            {("q1", "ack"): 2, ("q1", "retry"): 1, ("q2", "dead_letter"): 1}.get(
                (queue, kind.value), 0
            )
        )
        for queue in ("q1", "q2")
        for kind in OutcomeKind
    }
    assert found["strictconsume_handler_seconds_count"] == {
        (("queue", "q1"),): 3.0,
        (("queue", "q2"),): 1.0,
    }
    assert found["strictconsume_handler_seconds_sum"][(("queue", "q1"),)] == pytest.approx(0.223)
    buckets = found["strictconsume_handler_seconds_bucket"]
    assert buckets[(("le", "0.005"), ("queue", "q1"))] == 1.0
    assert buckets[(("le", "0.025"), ("queue", "q1"))] == 2.0
    assert buckets[(("le", "0.25"), ("queue", "q1"))] == 3.0
    assert buckets[(("le", "2.5"), ("queue", "q2"))] == 1.0
    assert buckets[(("le", "1.0"), ("queue", "q2"))] == 0.0
    assert buckets[(("le", "+Inf"), ("queue", "q2"))] == 1.0
    assert found["strictconsume_inflight"] == {(("queue", "q1"),): 0.0, (("queue", "q2"),): 0.0}
    assert found["strictconsume_connected"] == {(): 0.0}
    assert found["strictconsume_reconnects_total"] == {(): 3.0}
    assert found["strictconsume_consumer_timeouts_total"] == {
        (("queue", "q1"),): 0.0,
        (("queue", "q2"),): 1.0,
    }


@pytest.mark.anyio
async def test_mounted_in_a_starlette_app() -> None:
    app = _app_with_queues("q1")
    api = Starlette(routes=[Mount("/consumers", app=app.asgi())])
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        live = await client.get("/consumers/health/live")
        assert (live.status_code, live.json()["running"]) == (503, False)
        ready = await client.get("/consumers/health/ready")
        assert ready.json()["consumers"] == {"q1": "not subscribed"}
        metrics = await client.get("/consumers/metrics")
        assert metrics.status_code == 200
        assert "strictconsume_reconnects_total 0.0" in metrics.text
        assert (await client.get("/consumers/elsewhere")).status_code == 404
        assert (await client.get("/health/live")).status_code == 404  # not outside the mount


def test_asgi_app_without_prometheus_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name.startswith("prometheus_client"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    app = _app_with_queues("q1")
    with pytest.raises(ImportError, match=r"pip install 'strictconsume\[http\]'"):
        asgi_app(app, app.metrics)


def test_a_port_in_use_is_refused_with_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(_app_with_queues("q").asgi(), f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"cannot serve health and metrics on 127.0.0.1:{port}"):
            server.bind()


# -- logs ---------------------------------------------------------------------------------


def test_json_log_lines_carry_the_message_fields() -> None:
    record = logging.LogRecord(
        "strictconsume", logging.WARNING, __file__, 1, "queue %r failed", ("q",), None
    )
    fields = {
        "event": "message_failed",
        "queue": "q",
        "message_id": "m-1",
        "delivery_tag": 7,
        "attempt": 2,
        "duration": 0.25,
        "outcome": "retry",
        "error": "ValueError: boom",
        "delay": 1.0,
    }
    for key, value in fields.items():
        setattr(record, key, value)
    record.password = "never shown"  # only the known fields are written
    line = JSONFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data.pop("time").endswith("Z")
    assert data == {
        "level": "WARNING",
        "logger": "strictconsume",
        "message": "queue 'q' failed",
        **fields,
    }


# -- against the broker ---------------------------------------------------------------------


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"sc-observe-{uuid.uuid4().hex}"
    yield name
    oracle = Oracle(broker_url)
    for suffix in ("", ".dlq", ".retry.200"):
        oracle.delete_now(name + suffix)


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    return families(response.text)


@pytest.mark.broker
@pytest.mark.anyio
async def test_metrics_count_every_outcome_over_http(broker_url: str, queue: str) -> None:
    app = sc.App(url=broker_url, grace_period=1.0, http="127.0.0.1:0")
    release = anyio.Event()
    requeued: set[bytes] = set()

    @app.consumer(queue, timeout=5.0, retry=sc.Retry(delays=(0.2,)))
    async def handle(msg: sc.Message) -> None:
        if msg.body == b"fail":
            raise ValueError("always")
        if msg.body == b"reject":
            raise sc.Reject("bad")
        if msg.body == b"requeue-once" and msg.body not in requeued:
            requeued.add(msg.body)
            raise sc.Requeue()
        if msg.body == b"block":
            await release.wait()

    oracle = Oracle(broker_url)
    async with app.running(), httpx.AsyncClient() as client:
        url = app.http_url
        assert url is not None
        assert url.startswith("http://127.0.0.1:")
        assert (await client.get(f"{url}/health/live")).status_code == 200
        ready = await client.get(f"{url}/health/ready")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ok",
            "connected": True,
            "consumers": {queue: "subscribed"},
        }
        for body in (b"ok", b"fail", b"reject", b"requeue-once", b"block"):
            await oracle.publish(queue, body)

        def count(found: dict[str, Any], outcome: str) -> float:
            return float(
                found["strictconsume_messages_total"][(("outcome", outcome), ("queue", queue))]
            )

        async def settled_but_one() -> bool:
            found = await scrape(client, url)
            return (
                count(found, "ack") == 2  # ok, requeue-once (the second time)
                and count(found, "dead_letter") == 2  # reject, fail after its retry
                and found["strictconsume_inflight"][(("queue", queue),)] == 1.0  # block
            )

        await wait_until(settled_but_one, what="every message but one settled")
        found = await scrape(client, url)
        assert count(found, "retry") == 1
        assert count(found, "requeue") == 1
        assert count(found, "cancelled") == 0
        assert found["strictconsume_connected"] == {(): 1.0}
        assert found["strictconsume_reconnects_total"] == {(): 0.0}
        assert found["strictconsume_consumer_timeouts_total"] == {(("queue", queue),): 0.0}
        handled = found["strictconsume_handler_seconds_count"][(("queue", queue),)]
        assert handled == 6  # 2 ack + 2 dead letter + 1 retry + 1 requeue

        release.set()

        async def all_settled() -> bool:
            found = await scrape(client, url)
            return (
                count(found, "ack") == 3
                and found["strictconsume_inflight"][(("queue", queue),)] == 0.0
            )

        await wait_until(all_settled, what="the blocked message acked")
    assert app.http_url is None
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"{url}/health/live")
    assert await oracle.message_count(f"{queue}.dlq") == 2


def _ctl(*args: str) -> None:
    dev_broker("ctl", *args)


@pytest.fixture
def own_user(broker_ctl: None, broker_url: str) -> Iterator[tuple[str, str]]:
    """A user of its own on the dev broker: (name, password); deleted afterwards."""
    name, password = f"sc-observe-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _ctl("add_user", name, password)
    _ctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
    try:
        yield name, password
    finally:
        dev_broker("ctl", "delete_user", name, check=False)


@pytest.mark.broker
@pytest.mark.anyio
async def test_ready_is_503_while_the_app_cannot_reconnect(
    broker_url: str, queue: str, own_user: tuple[str, str]
) -> None:
    assert external_broker_url() is None
    name, password = own_user
    host = broker_url.split("@", 1)[1]
    app = sc.App(url=f"amqp://{name}:{password}@{host}", grace_period=1.0, http="127.0.0.1:0")

    @app.consumer(queue, timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        pass

    async with app.running(), httpx.AsyncClient() as client:
        url = app.http_url
        assert url is not None
        assert (await client.get(f"{url}/health/ready")).status_code == 200

        # Revoke the user's access and drop its connection: the App keeps retrying.
        await anyio.to_thread.run_sync(_ctl, "clear_permissions", "-p", "/", name)
        await anyio.to_thread.run_sync(_ctl, "close_all_connections", "test: observability")

        async def unready() -> bool:
            response = await client.get(f"{url}/health/ready")
            return response.status_code == 503 and response.json()["connected"] is False

        await wait_until(unready, what="/health/ready answering 503")
        live = await client.get(f"{url}/health/live")
        assert live.status_code == 200  # alive: reconnecting is not a reason to restart
        found = await scrape(client, url)
        assert found["strictconsume_connected"] == {(): 0.0}
        await anyio.sleep(1.0)
        assert (await client.get(f"{url}/health/ready")).status_code == 503  # still

        await anyio.to_thread.run_sync(_ctl, "set_permissions", "-p", "/", name, ".*", ".*", ".*")

        async def ready() -> bool:
            return (await client.get(f"{url}/health/ready")).status_code == 200

        await wait_until(ready, what="/health/ready answering 200 again", within=40.0)
        found = await scrape(client, url)
        assert found["strictconsume_connected"] == {(): 1.0}
        assert found["strictconsume_reconnects_total"] == {(): 1.0}
        body = (await client.get(f"{url}/metrics")).text + (
            await client.get(f"{url}/health/ready")
        ).text
        assert password not in body


@pytest.mark.broker
@pytest.mark.anyio
async def test_a_cancellation_from_outside_is_logged_and_requeues(
    broker_url: str, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = sc.App(url=broker_url, grace_period=30.0)
    started = anyio.Event()

    @app.consumer(queue, timeout=60.0)
    async def handle(msg: sc.Message) -> None:
        started.set()
        await anyio.sleep_forever()

    oracle = Oracle(broker_url)
    caplog.set_level(logging.INFO, logger="strictconsume")
    with anyio.move_on_after(DEADLINE) as scope:  # the web server's shutdown timeout, say
        async with app.running():
            await oracle.publish(queue, b"long")
            await started.wait()
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    stopped = [r for r in caplog.records if getattr(r, "event", None) == "stopped"]
    assert len(stopped) == 1
    assert stopped[0].levelno == logging.WARNING
    assert "without a grace period" in stopped[0].getMessage()
    assert "handled 1 message(s) (ack 0, retry 0, dead_letter 0, requeue 0, cancelled 1)" in (
        stopped[0].getMessage()
    )

    async def back_in_the_queue() -> bool:
        return await oracle.message_count(queue) == 1

    await wait_until(back_in_the_queue, what="the message requeued")
