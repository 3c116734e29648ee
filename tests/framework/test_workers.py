"""``python -m strictconsume --workers N`` as real processes against a real RabbitMQ:
a worker killed mid-load loses nothing and is started again, SIGTERM to the
supervisor drains every worker, one health and one merged ``/metrics`` for the set,
and a worker that cannot start stops the set.

Each worker runs ``tests/framework/process_app.py``, which records the ids its
handler started and finished in files named by its pid; the broker's side is read
with pika (the oracle). Synchronous, like tests/framework/test_process.py.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..processes import Consumer, Harness, drain, message_count, publish, settled_count, url_with

pytestmark = pytest.mark.broker

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])


def _pids(consumer: Consumer) -> dict[int, list[int]]:
    """Worker index -> the pids it had, in order, from the supervisor's log."""
    found: dict[int, list[int]] = {}
    for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", consumer.log()):
        found.setdefault(int(index), []).append(int(pid))
    return found


def _http(consumer: Consumer) -> str:
    consumer.wait_for(
        lambda: consumer.log_count("serving health and metrics on") == 1, 10, "the http line"
    )
    line = next(x for x in consumer.log().splitlines() if "serving health and metrics on" in x)
    return line.rsplit(" ", 1)[1]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _ready(http: str) -> tuple[int, dict[str, object]]:
    response = httpx.get(f"{http}/health/ready")
    return response.status_code, response.json()


@BACKENDS
def test_a_worker_killed_mid_load_loses_nothing_and_is_started_again(
    harness: Harness, backend: str
) -> None:
    consumer = harness.start(
        backend,
        "--workers",
        "2",
        "--prefetch",
        "20",
        "--grace-period",
        "5",
        "--http",
        "127.0.0.1:0",
        env={"PROCESS_APP_MARK_STARTED": "1", "PROCESS_APP_SLEEP_MAX": "0.2"},
    )
    http = _http(consumer)
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 2, 20, "2 ready lines")
    consumer.wait_for(lambda: _ready(http)[0] == 200, 5, "the set ready")
    ids = [f"m-{i:04d}" for i in range(600)]
    publish(harness.url, harness.queue, [{"id": i} for i in ids])
    consumer.wait_for(lambda: len(consumer.finished()) >= 100, 20, "100 handled")
    victim = _pids(consumer)[0][0]
    consumer.wait_for(
        lambda: (harness.directory / "records0" / f"{victim}.started").exists(),
        10,
        "the victim handling messages",
    )
    os.kill(victim, signal.SIGKILL)
    # Readiness drops at once for the whole set, and names the worker.
    consumer.wait_for(lambda: _ready(http)[0] == 503, 3, "the set not ready")
    status, body = _ready(http)
    assert status == 503
    assert body["workers"]["0"]["ready"] is False, body  # type: ignore[index]
    consumer.wait_for(lambda: len(_pids(consumer).get(0, [])) == 2, 15, "worker 0 started again")
    consumer.wait_for(lambda: _ready(http)[0] == 200, 20, "the set ready again")
    consumer.wait_for(lambda: set(consumer.finished()) >= set(ids), 30, "every message handled")

    signalled = consumer.send(signal.SIGTERM)
    code, exited = consumer.wait_exit(15)
    log = consumer.log()
    print(
        f"[{backend}] {len(consumer.finished())} handled for 600 published (duplicates are "
        f"the killed worker's unacked ones); exit {code} {exited - signalled:.2f} s after "
        "SIGTERM"
    )
    assert code == 0, log
    assert f"worker 0 (pid {victim}) was killed by SIGKILL; starting it again in" in log, log
    # The messages the victim had started but not acked went to the other workers.
    victim_started = set((harness.directory / "records0" / f"{victim}.started").read_text().split())
    victim_finished = harness.directory / "records0" / f"{victim}.finished"
    unfinished = victim_started - set(victim_finished.read_text().split())
    others = {
        i
        for path in (harness.directory / "records0").glob("*.finished")
        if path != victim_finished
        for i in path.read_text().split()
    }
    print(f"[{backend}] the killed worker held {len(unfinished)} unfinished handler(s)")
    assert unfinished, "the kill came when the victim had nothing in flight"
    assert unfinished <= others
    assert message_count(harness.url, harness.queue) == 0
    assert message_count(harness.url, f"{harness.queue}.dlq") == 0
    assert log.count("exited with code 0") == 2, log
    assert "every worker stopped cleanly" in log
    assert "strictconsume[worker 0]: ready: consuming" in log, log


@BACKENDS
def test_sigterm_drains_every_worker_and_metrics_sum_them(harness: Harness, backend: str) -> None:
    grace = 2.0
    consumer = harness.start(
        backend,
        "--workers",
        "2",
        "--prefetch",
        "64",
        "--grace-period",
        str(grace),
        "--http",
        "127.0.0.1:0",
        env={"PROCESS_APP_MARK_STARTED": "1"},
    )
    http = _http(consumer)
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 2, 20, "2 ready lines")
    consumer.wait_for(lambda: _ready(http)[0] == 200, 5, "the set ready")
    assert httpx.get(f"{http}/health/live").status_code == 200

    # Quick ones first, for the sums: each worker gets some (round robin).
    quick = [f"quick-{i:02d}" for i in range(20)]
    publish(harness.url, harness.queue, [{"id": i, "sleep": 0} for i in quick])
    consumer.wait_for(lambda: len(consumer.finished()) == 20, 10, "20 handled")
    per_pid = {p.name: len(p.read_text().split()) for p in consumer.record_dir.glob("*.finished")}
    assert len(per_pid) == 2, per_pid
    samples = _samples(httpx.get(f"{http}/metrics").text)
    ack = (
        "strictconsume_messages_total",
        (("outcome", "ack"), ("queue", harness.queue)),
    )
    assert samples[ack] == 20, samples
    count = ("strictconsume_handler_seconds_count", (("queue", harness.queue),))
    assert samples[count] == 20
    assert samples[("strictconsume_connected", ())] == 1
    assert samples[("strictconsume_workers", (("state", "ready"),))] == 2

    fast = [f"fast-{i:02d}" for i in range(20)]
    slow = [f"slow-{i:02d}" for i in range(20)]
    messages: list[dict[str, object]] = []
    for i in range(20):  # fast, slow, slow, fast, ...: each worker gets both (round robin)
        pair = [{"id": fast[i], "sleep": 0.3 + 0.6 * i / 19}, {"id": slow[i], "sleep": 60}]
        messages.extend(pair if i % 2 == 0 else pair[::-1])
    publish(harness.url, harness.queue, messages)
    consumer.wait_for(lambda: len(consumer.started()) == 60, 10, "40 more handlers started")
    inflight = _samples(httpx.get(f"{http}/metrics").text)
    running = inflight[("strictconsume_inflight", (("queue", harness.queue),))]
    assert 20 <= running <= 40, inflight

    signalled = consumer.send(signal.SIGTERM)
    code, exited = consumer.wait_exit(grace + 10)
    took = exited - signalled
    log = consumer.log()
    print(f"[{backend}] exit {code} {took:.2f} s after SIGTERM (grace {grace:g} s)")
    assert code == 0, log
    assert grace - 0.2 <= took <= grace + 8
    assert sorted(consumer.finished()) == sorted(quick + fast)
    assert settled_count(harness.url, harness.queue, 20) == 20, log
    back = drain(harness.url, harness.queue)
    assert sorted(i for i, _ in back) == slow
    assert all(redelivered for _, redelivered in back), back
    assert log.count("grace period over; cancelling") == 2, log
    assert log.count("exited with code 0") == 2, log
    assert "Traceback" not in log, log


@BACKENDS
def test_a_worker_that_cannot_start_stops_the_set(harness: Harness, backend: str) -> None:
    secret = f"wrong-{uuid.uuid4().hex}"
    began = time.monotonic()
    consumer = harness.start(
        backend, "--workers", "2", "--url", url_with(harness.url, password=secret)
    )
    code, exited = consumer.wait_exit(20)
    log = consumer.log()
    print(f"[{backend}] wrong password, 2 workers: exit {code} after {exited - began:.2f} s")
    assert code == 1, log
    assert "could not start (exit code 1): stopping every worker" in log, log
    assert "starting it again" not in log, log
    assert secret not in log
    assert "Traceback" not in log, log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@BACKENDS
def test_workers_stop_gracefully_when_their_supervisor_is_killed(
    harness: Harness, backend: str
) -> None:
    consumer = harness.start(backend, "--workers", "2", "--grace-period", "5")
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 2, 20, "2 ready lines")
    pids = [found[0] for found in _pids(consumer).values()]
    assert len(pids) == 2
    consumer.send(signal.SIGKILL)
    consumer.wait_exit(5)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = consumer.log()
    assert not any(_alive(pid) for pid in pids), log
    assert log.count("the supervisor of the workers is gone: shutting down") == 2, log
    assert log.count("stopped after handling 0 message(s)") == 2, log


@BACKENDS
def test_a_second_signal_to_the_supervisor_skips_the_workers_grace_period(
    harness: Harness, backend: str
) -> None:
    consumer = harness.start(
        backend,
        "--workers",
        "2",
        "--grace-period",
        "30",
        env={"PROCESS_APP_MARK_STARTED": "1"},
    )
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 2, 20, "2 ready lines")
    slow = [f"slow-{i:02d}" for i in range(10)]
    publish(harness.url, harness.queue, [{"id": i, "sleep": 60} for i in slow])
    consumer.wait_for(lambda: len(consumer.started()) == 10, 10, "10 handlers started")
    assert len(list(consumer.record_dir.glob("*.started"))) == 2  # both workers hold some
    consumer.send(signal.SIGINT)
    consumer.wait_for(
        lambda: consumer.log_count("handler(s) still running") == 2, 5, "both workers draining"
    )
    second = consumer.send(signal.SIGINT)
    code, exited = consumer.wait_exit(10)
    log = consumer.log()
    print(f"[{backend}] exit {code} {exited - second:.2f} s after the second SIGINT")
    assert code == 0, log
    assert exited - second < 5
    assert consumer.finished() == []
    assert settled_count(harness.url, harness.queue, 10) == 10, log
    assert sorted(i for i, _ in drain(harness.url, harness.queue)) == slow
    assert log.count("SIGTERM again: skipping the grace period") == 2, log


def test_an_http_address_in_use_stops_the_supervisor_with_one_line(harness: Harness) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        consumer = harness.start("trio", "--workers", "2", "--http", f"127.0.0.1:{port}")
        code, _ = consumer.wait_exit(15)
    log = consumer.log()
    errors = [line for line in log.splitlines() if line.startswith("strictconsume: error:")]
    assert code == 1, log
    assert len(errors) == 1, log
    assert f"cannot serve health and metrics on 127.0.0.1:{port}" in errors[0]
    assert "worker 0 started" not in log, log
