"""``python -m strictconsume`` as a real process against a real RabbitMQ (design
sections 3, 5 and 7): a graceful shutdown on SIGTERM, a second SIGTERM, fatal
start-up errors and their exit codes, JSON logs and --http. Reconnecting through
faults without losing a message is tests/faults/test_faults.py.

The process runs ``tests/framework/process_app.py``, which records every message id
its handler finished in a file per process; the broker's state is read with pika
(``tests/amqp/oracle.py``) and ``scripts/dev-broker ctl list_queues``. These tests
are synchronous: they drive processes, and no event loop runs in them.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.parse
import uuid

import httpx
import pika
import pytest

from ..amqp.oracle import pika_channel
from ..conftest import dev_broker
from ..processes import (
    APP,
    SHARED_NODE,
    Consumer,
    Harness,
    ctl_available,
    drain,
    message_count,
    publish,
    settled_count,
    unacked_when_settled,
    url_with,
)

pytestmark = pytest.mark.broker

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])


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
    # The fast handlers that finished between the count above and the signal (a loaded
    # machine) are not running at the signal any more; the 25 slow ones always are.
    running = re.search(
        rf"shutting down: stopping intake; (\d+) handler\(s\) running get a grace period "
        rf"of {grace:g} s",
        log,
    )
    assert running, log
    assert 25 <= int(running.group(1)) <= 50 - finished_before, log
    for line in (
        "SIGTERM received: shutting down",
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
    url = url_with(harness.url, password=secret)
    code, took, log = _run_to_exit(harness, backend, "--url", url)
    print(f"[{backend}] wrong password: exit {code} after {took:.2f} s: {_error_lines(log)}")
    assert code == 1, log
    assert took < 10
    assert len(_error_lines(log)) == 1, log
    assert secret not in log
    assert "Traceback" not in log, log


@BACKENDS
def test_unknown_vhost_is_fatal_with_one_line(harness: Harness, backend: str) -> None:
    vhost = f"no-such-vhost-{uuid.uuid4().hex[:8]}"
    url = url_with(harness.url, vhost=vhost)
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
        url = url_with(harness.url, user=user, password=password)
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
