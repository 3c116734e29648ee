"""No message is lost, whatever breaks (design section 9, issue 7).

Each test publishes a few thousand messages to a private node of its own (``own_node``:
these tests close its connections, restart it and freeze it), runs ``python -m
strictconsume tests.faults.fault_app:app`` on trio and on asyncio, injects one kind of
fault while the load is being handled, and ends with the same invariant
(:meth:`tests.faults.harness.FaultRun.check`): every message was handled to the end
(recorded durably by the handler before its ack) or sits in the dead-letter queue with
its reason; nothing is left queued, waiting for a retry or unacked; lost = 0.
Duplicates, which at-least-once delivery allows, are counted. Every run keeps some
messages that fail on every attempt (retried twice, then dead-lettered) and some that
are rejected, so the retry and dead-letter paths run under the faults too.

Each test prints a ``FaultReport`` line (``-s`` to see it) and appends it to the file
in ``STRICTCONSUME_FAULT_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ..conftest import dev_broker
from ..processes import Harness, Node
from .harness import (
    FaultRun,
    beam_pid,
    connection_lost_at,
    events,
    log_time,
    url_with_query,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])

#: Messages per test: at prefetch 50 and up to 0.2 s per handler, some 10 s of load.
TOTAL = 3000
PREFETCH = 50
#: The heartbeat of the pause test, and how long the broker may take to be found dead.
HEARTBEAT = 2
DETECT_BOUND = 2 * HEARTBEAT + 1.5
#: How long the pause test's client waits for a frozen broker's handshake.
CONNECTION_TIMEOUT = 2


@BACKENDS
def test_close_all_connections_repeatedly(own_node: Node, harness: Harness, backend: str) -> None:
    """Five times at random points of the load the broker closes every connection
    (``rabbitmqctl close_all_connections``): the consumer reconnects each time, and
    nothing is lost."""
    run = FaultRun.prepare(
        "close_all_connections", backend, own_node, harness, TOTAL, prefetch=PREFETCH
    )
    consumer = run.start()
    run.wait_ready(consumer, 1)
    for k, point in enumerate(sorted(run.rng.uniform(0.05, 0.75) for _ in range(5)), 1):
        done = run.wait_progress(consumer, point)
        noticed_before = len(events(consumer, "reconnecting"))
        ready_before = len(events(consumer, "ready"))
        asked = time.time()
        dev_broker(*own_node.args, "ctl", "close_all_connections", "test")
        run.injected += 1

        def noticed_close(n: int = noticed_before) -> bool:
            return len(events(consumer, "reconnecting")) > n

        consumer.wait_for(noticed_close, 10, "the close")
        noticed = events(consumer, "reconnecting")[noticed_before]
        assert "320 CONNECTION_FORCED" in noticed.message, noticed
        lost = connection_lost_at(consumer, asked)
        assert lost is not None
        ready = run.recovered(consumer, ready_before, lost)
        print(
            f"{run.tag} close {k} at {done} finished: the consumer saw it "
            f"{lost - asked:.2f} s after the command began ('reconnecting' "
            f"{noticed.time - lost:.2f} s later), ready again {ready - lost:.2f} s after"
        )
    report = run.check(consumer)
    assert report.injected == 5


@BACKENDS
def test_broker_restart(own_node: Node, harness: Harness, backend: str) -> None:
    """The node is stopped and started again mid-load: the consumer reconnects once it
    is back, and the persistent messages (queued, unacked, waiting for a retry) are
    all handled or dead-lettered."""
    run = FaultRun.prepare("broker_restart", backend, own_node, harness, TOTAL, prefetch=PREFETCH)
    consumer = run.start()
    run.wait_ready(consumer, 1)
    done = run.wait_progress(consumer, run.rng.uniform(0.2, 0.5))
    ready_before = len(events(consumer, "ready"))
    stopping = time.time()
    dev_broker(*own_node.args, "stop")
    stopped = time.time()
    dev_broker(*own_node.args, "start")
    started = time.time()
    run.injected += 1
    ready = run.recovered(consumer, ready_before, stopping)
    run.figures["ready_after_node_up_s"] = round(ready - started, 3)
    print(
        f"{run.tag} restart at {done} finished: stop {stopped - stopping:.1f} s, start "
        f"{started - stopped:.1f} s; ready again {ready - started:.2f} s after the node was "
        f"up, {ready - stopping:.2f} s after the stop began"
    )
    run.check(consumer)


@BACKENDS
def test_broker_paused_longer_than_two_heartbeats(
    own_node: Node, harness: Harness, backend: str
) -> None:
    """The broker's beam.smp is frozen with SIGSTOP mid-load. With ``heartbeat=2`` the
    consumer notices within two heartbeat intervals (plus 1.5 s of tolerance), tries
    to reconnect while the broker is still frozen (the TCP connect succeeds, the kernel
    accepts it, but the handshake never answers: the attempt must give up after
    ``connection_timeout``, not hang), reconnects once the broker resumes (SIGCONT),
    and loses nothing."""
    run = FaultRun.prepare("broker_paused", backend, own_node, harness, TOTAL, prefetch=PREFETCH)
    url = url_with_query(own_node.url, heartbeat=HEARTBEAT, connection_timeout=CONNECTION_TIMEOUT)
    consumer = run.start(url=url)
    run.wait_ready(consumer, 1)
    done = run.wait_progress(consumer, run.rng.uniform(0.2, 0.5))
    ready_before = len(events(consumer, "ready"))
    noticed_before = len(events(consumer, "reconnecting"))
    beam = beam_pid(own_node)

    def reconnecting(n: int) -> bool:
        return len(events(consumer, "reconnecting")) >= noticed_before + n

    paused = time.time()
    os.kill(beam, signal.SIGSTOP)
    try:
        run.injected += 1
        consumer.wait_for(lambda: reconnecting(1), 15, "the heartbeat failure")
        # the broker stays frozen until a reconnect attempt against it gave up
        consumer.wait_for(lambda: reconnecting(2), 3 * CONNECTION_TIMEOUT + 5, "a retry")
        if time.time() < paused + 6:
            time.sleep(paused + 6 - time.time())
    finally:
        os.kill(beam, signal.SIGCONT)
        resumed = time.time()
    detected, attempt = events(consumer, "reconnecting")[noticed_before : noticed_before + 2]
    ready = run.recovered(consumer, ready_before, paused)
    failed = connection_lost_at(consumer, paused)
    assert failed is not None
    run.figures.update(
        detect_s=round(detected.time - paused, 3),
        connection_failed_s=round(failed - paused, 3),
        paused_s=round(resumed - paused, 3),
        ready_after_resume_s=round(ready - resumed, 3),
        frozen_handshake_gave_up_s=round(attempt.time - detected.time, 3),
    )
    print(
        f"{run.tag} paused at {done} finished for {resumed - paused:.2f} s: the consumer "
        f"logged 'reconnecting' after {detected.time - paused:.2f} s (bound "
        f"{DETECT_BOUND:g} s; first sign of the failure after {failed - paused:.2f} s): "
        f"{detected.message!r}; then, with the broker frozen: {attempt.message!r}; ready "
        f"again {ready - resumed:.2f} s after SIGCONT"
    )
    assert "heartbeat" in detected.message, detected
    assert detected.time - paused <= DETECT_BOUND, detected
    assert "did not complete the AMQP handshake" in attempt.message, attempt
    assert attempt.time < resumed
    run.check(consumer)


@BACKENDS
def test_consumer_sigterm_and_a_new_process(own_node: Node, harness: Harness, backend: str) -> None:
    """SIGTERM stops the consumer mid-load (a 1 s grace period: slow handlers are
    cancelled and their messages requeued), and a new process on the same queue
    finishes the load: the invariant holds over both processes' records."""
    run = FaultRun.prepare(
        "consumer_sigterm", backend, own_node, harness, TOTAL, prefetch=PREFETCH, grace_period=1.0
    )
    first = run.start()
    run.wait_ready(first, 1)
    done = run.wait_progress(first, run.rng.uniform(0.2, 0.5))
    run.wait_slow_in_flight(first)
    signalled = time.time()
    first.send(signal.SIGTERM)
    run.injected += 1
    code, _ = first.wait_exit(run.grace_period + 15)
    exited = time.time()
    run.process_ends.append(exited)
    assert code == 0, first.tail()
    log = first.log()
    assert "SIGTERM received: shutting down" in log, log
    assert events(first, "grace_over"), "no handler outlived the grace period"
    cancelled = [r for r in run.runs() if r.pid == first.proc.pid and r.outcome == "cancelled"]
    assert cancelled, "no handler was cancelled at the end of the grace period"
    second = run.start()
    ready = run.recovered(second, 0, signalled)
    run.figures["exit_after_sigterm_s"] = round(exited - signalled, 3)
    print(
        f"{run.tag} SIGTERM at {done} finished: exit {code} after {exited - signalled:.2f} s "
        f"({len(cancelled)} handler(s) cancelled); the new process ready "
        f"{ready - exited:.2f} s after the exit"
    )
    report = run.check(second)
    # a graceful stop acks every handler that finished before it closes the connection
    assert report.redelivered_after_end == 0
    assert report.duplicated == 0


@BACKENDS
def test_consumer_sigkill_and_a_restart(own_node: Node, harness: Harness, backend: str) -> None:
    """SIGKILL mid-load: the messages in flight at the kill (runs that never ended)
    come back redelivered to a new process; a handler that finished before its ack
    was sent runs again (a duplicate, counted); nothing is lost."""
    run = FaultRun.prepare("consumer_sigkill", backend, own_node, harness, TOTAL, prefetch=PREFETCH)
    first = run.start()
    run.wait_ready(first, 1)
    done = run.wait_progress(first, run.rng.uniform(0.2, 0.5))
    run.wait_slow_in_flight(first)
    killed = run.kill(first)
    run.injected += 1
    code, _ = first.wait_exit(10)
    assert code == -signal.SIGKILL
    in_flight = [r for r in run.runs() if r.pid == first.proc.pid and r.ended is None]
    assert in_flight, "no handler was running at the kill"
    second = run.start()
    ready = run.recovered(second, 0, killed)
    run.figures["in_flight_at_kill"] = len(in_flight)
    print(
        f"{run.tag} SIGKILL at {done} finished with {len(in_flight)} handler(s) running; "
        f"the new process ready {ready - killed:.2f} s after the kill"
    )
    report = run.check(second)
    again = {r.id for r in run.runs() if r.pid == second.proc.pid and r.redelivered}
    assert {r.id for r in in_flight} <= again, {r.id for r in in_flight} - again
    print(f"{run.tag} {report.duplicated} duplicated id(s)")


@BACKENDS
def test_a_settlement_in_flight_does_not_hold_up_the_reconnect(
    own_node: Node, harness: Harness, backend: str
) -> None:
    """When the connection dies while failed messages' retry copies wait for their
    confirms, the consumer logs ``reconnecting`` (and reconnects) at once: the pause
    meant for a broker that refuses copies is not spent on a connection that is gone,
    whose messages the broker requeues anyway.

    Every message fails, so with the broker frozen (SIGSTOP) every handler that ends
    waits for a confirm that never comes, until the heartbeat fails the connection."""
    run = FaultRun.prepare(
        "settlement_in_flight",
        backend,
        own_node,
        harness,
        400,
        mix={"fail": 1.0, "reject": 0.0, "slow": 0.0, "sleep_max": 0.02},
        prefetch=20,
    )
    consumer = run.start(url=url_with_query(own_node.url, heartbeat=HEARTBEAT))
    run.wait_ready(consumer, 1)
    consumer.wait_for(lambda: len(run.runs()) >= 50, 30, "50 handler runs")
    beam = beam_pid(own_node)
    os.kill(beam, signal.SIGSTOP)
    try:
        consumer.wait_for(lambda: bool(events(consumer, "reconnecting")), 15, "the failure")
    finally:
        os.kill(beam, signal.SIGCONT)
    failed_at = [
        line
        for line in consumer.log().splitlines()
        if "could not publish" in line and "heartbeat" in line
    ]
    assert failed_at, "no retry copy was waiting for its confirm when the connection failed"
    lost = json.loads(failed_at[0])["time"]
    noticed = events(consumer, "reconnecting")[0]
    gap = noticed.time - log_time(lost)
    print(f"{run.tag} 'reconnecting' {gap:.3f} s after the connection failed")
    assert gap < 0.5, noticed
