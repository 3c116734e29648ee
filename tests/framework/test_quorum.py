"""Quorum queues against a real RabbitMQ: ``queue_type="quorum"``, ``delivery_limit``
and ``msg.attempt`` counting the broker's ``x-delivery-count``, on each version.

What the brokers do, observed with pika and asserted below:

- ``x-delivery-count`` is absent on a message's first delivery through basic.consume,
  and counts returns to the queue on later deliveries (with ``redelivered`` set).
- Before RabbitMQ 4.3 every return counts: a nack or reject with requeue, or the
  channel or connection lost with the message unacked. From 4.3 only a failure
  counts (a reject with requeue, a lost channel or connection); a nack with requeue
  (what ``sc.Requeue`` sends) does not, and the broker counts every return in
  ``x-acquired-count`` instead (``strictconsume._versions.nack_counts_as_delivery``).
- ``x-delivery-limit = N`` allows N counted returns: the (N + 1)-th dead-letters the
  message instead of requeueing it. The dead letter goes where the queue's
  ``x-dead-letter-*`` arguments say, with an ``x-death`` entry of reason
  ``delivery_limit``. Read with basic.get from the ``.dlq`` (a quorum queue too) it
  carries ``x-delivery-count = 0`` before 4.0; from 4.0 it keeps the count it
  reached (and from 4.3 its ``x-acquired-count``), and a message that was never
  returned has no such header.
- ``x-delivery-limit`` is part of the redeclare equivalence check: declaring the queue
  again with another limit, or without one, is refused with 406.

Each test runs an :class:`strictconsume.App` in-process on trio and on asyncio; pika
(``tests/amqp/oracle.py``) is the independent client, and ``rabbitmqctl`` (when the
broker is ours) gives the unacked counts and the declared arguments. Queue names are
unique per test and deleted at the end, with their ``.dlq`` and retry queues.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import attrs
import pytest

import strictconsume as sc
from strictconsume._versions import nack_counts_as_delivery

from ..amqp.oracle import Oracle, OracleMessage
from ..conftest import dev_broker, external_broker_url
from .polling import DEADLINE, depths, empty, wait_for_count, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.anyio]

#: Every retry delay this file uses, in ms: the teardown deletes ``<queue>.retry.<ms>``.
RETRY_MS = (100, 200)
#: The retry policy where the test does not care (its queue is deleted afterwards).
RETRY = sc.Retry(delays=(0.2,))
#: A short grace period, so that a test that fails inside ``app.running()`` ends fast.
GRACE = 1.0


# -- pika and rabbitmqctl ----------------------------------------------------------------


@attrs.frozen
class CtlQueue:
    """One queue as ``rabbitmqctl list_queues`` reports it."""

    type: str
    arguments: dict[str, Any]
    ready: int
    unacked: int


def _ctl_queues() -> dict[str, CtlQueue]:
    out = dev_broker(
        "ctl",
        "list_queues",
        "--formatter",
        "json",
        "name",
        "type",
        "arguments",
        "messages_ready",
        "messages_unacknowledged",
    ).stdout
    queues = {}
    for row in json.loads(out):
        queues[row["name"]] = CtlQueue(
            type=row["type"],
            # each argument is [name, AMQP type, value]
            arguments={name: value for name, _type, value in row["arguments"]},
            ready=int(row["messages_ready"]),
            unacked=int(row["messages_unacknowledged"]),
        )
    return queues


async def ctl_queue(queue: str) -> CtlQueue | None:
    """``queue`` as rabbitmqctl sees it; None with an outside broker."""
    if external_broker_url() is not None:
        return None
    queues = await anyio.to_thread.run_sync(_ctl_queues)
    assert queue in queues, f"rabbitmqctl does not list queue {queue!r}: {sorted(queues)}"
    return queues[queue]


async def assert_nothing_unacked(queue: str, ready: int = 0) -> None:
    seen = await ctl_queue(queue)
    if seen is not None:
        assert (seen.ready, seen.unacked) == (ready, 0), f"(ready, unacked) of {queue!r}"


async def close_all_connections() -> None:
    """Close every client connection of the broker, as an operator would."""
    await anyio.to_thread.run_sync(
        lambda: dev_broker("ctl", "close_all_connections", "test-quorum")
    )


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def oracle(broker_url: str) -> Oracle:
    return Oracle(broker_url)


@attrs.define
class Names:
    """Unique queue names; every one is deleted afterwards with its companions."""

    queues: list[str] = attrs.Factory(list)

    def queue(self) -> str:
        name = f"sc-quorum-{uuid.uuid4().hex}"
        self.queues.append(name)
        return name


@pytest.fixture
def names(oracle: Oracle) -> Iterator[Names]:
    made = Names()
    yield made
    for queue in made.queues:
        for name in (queue, f"{queue}.dlq", *(f"{queue}.retry.{ms}" for ms in RETRY_MS)):
            oracle.delete_now(name)


def main_arguments(queue: str, delivery_limit: int | None) -> dict[str, Any]:
    """The arguments a quorum consumer's queue must have."""
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{queue}.dlq",
        "x-queue-type": "quorum",
    }
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    return arguments


async def get_dead_letter(oracle: Oracle, queue: str) -> OracleMessage:
    dead = await oracle.get(f"{queue}.dlq")
    assert dead is not None, f"nothing in {queue}.dlq"
    assert dead.message_count == 0, "more than one dead letter"
    return dead


def get_shows_a_zero_count(version: tuple[int, int, int]) -> bool:
    """Before RabbitMQ 4.0 a basic.get from a quorum queue shows ``x-delivery-count``
    0 on a message's first delivery; from 4.0 the header is absent there."""
    return version[:2] < (4, 0)


def _death(headers: Any) -> list[tuple[str, str]]:
    """(queue, reason) of each ``x-death`` entry of a message's headers."""
    deaths = (headers or {}).get("x-death") or []
    return [(_str(entry.get("queue")), _str(entry.get("reason"))) for entry in deaths]


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- 1. the declared arguments -----------------------------------------------------------


async def test_delivery_limit_arguments_are_declared(broker_url: str, names: Names) -> None:
    default_q, explicit_q, unlimited_q = names.queue(), names.queue(), names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)

    async def handle(msg: sc.Message) -> None:
        raise AssertionError("nothing is published")

    app.consumer(default_q, queue_type="quorum", retry=RETRY, timeout=5.0)(handle)
    app.consumer(explicit_q, queue_type="quorum", delivery_limit=7, retry=RETRY, timeout=5.0)(
        handle
    )
    app.consumer(unlimited_q, queue_type="quorum", delivery_limit=0, retry=RETRY, timeout=5.0)(
        handle
    )

    expected = {
        default_q: main_arguments(default_q, 20),
        explicit_q: main_arguments(explicit_q, 7),
        unlimited_q: main_arguments(unlimited_q, None),
    }
    async with app.running():
        for queue, arguments in expected.items():
            assert await Oracle(broker_url).has_arguments(queue, arguments), queue
            # the limit is checked on redeclare: another one, or none, is refused
            other = {**arguments, "x-delivery-limit": arguments.get("x-delivery-limit", 0) + 1}
            assert not await Oracle(broker_url).has_arguments(queue, other), queue
            if "x-delivery-limit" in arguments:
                without = {k: v for k, v in arguments.items() if k != "x-delivery-limit"}
                assert not await Oracle(broker_url).has_arguments(queue, without), queue
            # the dead-letter queue is a quorum queue too (it must survive its node)
            dlq_arguments = {"x-queue-type": "quorum"}
            assert await Oracle(broker_url).has_arguments(f"{queue}.dlq", dlq_arguments), queue
            seen = await ctl_queue(queue)
            if seen is not None:
                assert seen.type == "quorum"
                assert seen.arguments == arguments


def test_delivery_limit_needs_a_quorum_queue() -> None:
    async def handle(msg: sc.Message) -> None:
        raise AssertionError("never called")

    app = sc.App(url="amqp://guest:guest@127.0.0.1:1/")
    for limit in (0, 5, 20):
        with pytest.raises(ValueError, match="delivery_limit needs queue_type='quorum'"):
            sc.consumer("q-classic", delivery_limit=limit)(handle)
        with pytest.raises(ValueError, match="delivery_limit needs queue_type='quorum'"):
            app.consumer("q-classic", queue_type="classic", delivery_limit=limit)(handle)
    for bad in (-1, -20, True, 2.5, "3"):
        with pytest.raises(ValueError, match="delivery_limit must be an int >= 0"):
            sc.consumer("q-quorum", queue_type="quorum", delivery_limit=bad)(handle)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delivery_limit must be an int >= 0"):
        app.consumer("q-quorum", queue_type="quorum", delivery_limit=-1)(handle)
    # nothing was registered by the refused declarations
    assert repr(app) == "<strictconsume.App consuming []>"


async def test_existing_quorum_queue_without_a_limit_needs_delivery_limit_0(
    broker_url: str, oracle: Oracle, names: Names
) -> None:
    """A quorum queue declared without ``x-delivery-limit`` (by an older version, or
    by hand) is a start-up error with the default limit; ``delivery_limit=0`` fits it."""
    queue = names.queue()
    await Oracle(broker_url).declare_durable(queue, main_arguments(queue, None))

    async def handle(msg: sc.Message) -> None:
        raise AssertionError("nothing is published")

    app = sc.App(url=broker_url, grace_period=GRACE)
    app.consumer(queue, queue_type="quorum", retry=RETRY, timeout=5.0)(handle)
    with anyio.fail_after(DEADLINE), pytest.raises(sc.StartupError) as info:
        async with app.running():
            pytest.fail("started against a queue without x-delivery-limit")
    assert queue in str(info.value), str(info.value)
    assert "x-delivery-limit" in str(info.value), str(info.value)
    assert await Oracle(broker_url).has_arguments(queue, main_arguments(queue, None))

    app = sc.App(url=broker_url, grace_period=GRACE)
    app.consumer(queue, queue_type="quorum", delivery_limit=0, retry=RETRY, timeout=5.0)(handle)
    async with app.running():
        assert app.ready
        assert await oracle.consumer_count(queue) == 1


# -- 2. msg.attempt counts the broker's redeliveries ----------------------------------


async def test_attempt_and_requeues_on_a_quorum_queue(
    broker_url: str, broker_version: tuple[int, int, int], oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[int, bool, object]] = []
    done = anyio.Event()

    @app.consumer(queue, queue_type="quorum", retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.attempt, msg.redelivered, msg.headers.get("x-delivery-count")))
        if len(seen) < 3:
            raise sc.Requeue()
        done.set()

    async with app.running():
        await oracle.publish(queue, b"twice back")
        with anyio.fail_after(DEADLINE):
            await done.wait()

        async def acked() -> bool:
            seen_by_ctl = await ctl_queue(queue)
            return seen_by_ctl is None or (seen_by_ctl.ready, seen_by_ctl.unacked) == (0, 0)

        await wait_until(acked, what="the message acked")

    if nack_counts_as_delivery(broker_version):
        # before 4.3 the first delivery has no x-delivery-count; each requeue adds one
        assert seen == [(1, False, None), (2, True, 1), (3, True, 2)]
    else:
        # from 4.3 a requeue (basic.nack) is not a failure: no count, no attempt
        assert seen == [(1, False, None), (1, True, None), (1, True, None)]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "requeue"] == 2
    assert app.outcomes[queue, "ack"] == 1


# -- 3. the broker enforces the delivery limit ------------------------------------------


def assert_dead_lettered_by_the_broker(
    headers: dict[str, Any], queue: str, version: tuple[int, int, int], count: int | None
) -> None:
    """Dead-lettered by the broker's delivery limit, not by strictconsume: an
    ``x-death`` entry, no ``x-error-*`` and no ``x-attempt``; ``count`` is the
    ``x-delivery-count`` it shows when read from the ``.dlq`` (None: absent)."""
    assert _death(headers) == [(queue, "delivery_limit")]
    assert headers["x-death"][0]["count"] == 1
    assert headers["x-death"][0]["routing-keys"] == [queue]
    assert headers["x-first-death-reason"] == "delivery_limit"
    assert headers["x-first-death-queue"] == queue
    assert headers.get("x-delivery-count") == count
    # 4.3 counts every return in x-acquired-count, which the dead letter keeps
    assert headers.get("x-acquired-count") == (None if nack_counts_as_delivery(version) else count)
    assert not [name for name in headers if name.startswith("x-error-")]
    assert "x-attempt" not in headers


async def test_requeues_and_the_delivery_limit(
    broker_url: str, broker_version: tuple[int, int, int], oracle: Oracle, names: Names
) -> None:
    """Before 4.3 a handler that always raises ``Requeue`` meets the delivery limit
    (limit 2: three deliveries, then the broker dead-letters the message); from 4.3 a
    requeue does not count, so it goes on until the handler acks."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[int, bool]] = []
    counts = nack_counts_as_delivery(broker_version)
    done = anyio.Event()

    @app.consumer(
        queue,
        queue_type="quorum",
        delivery_limit=2,
        retry=sc.Retry(delays=(0.2,)),
        timeout=5.0,
    )
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.attempt, msg.redelivered))
        if len(seen) < 5:
            raise sc.Requeue()
        done.set()

    async with app.running():
        await oracle.publish(queue, b"back and back", headers={"k": "v"})
        if counts:
            await wait_for_count(oracle, f"{queue}.dlq", 1)
            await anyio.sleep(0.5)  # a fourth delivery would show up by now
        else:
            with anyio.fail_after(DEADLINE):
                await done.wait()

    await assert_nothing_unacked(queue)
    if not counts:
        assert seen == [(1, False)] + [(1, True)] * 4
        assert (app.outcomes[queue, "requeue"], app.outcomes[queue, "ack"]) == (4, 1)
        assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
        return
    # limit 2 allows two returns, so three deliveries; the third return (the count
    # would become 3 > 2) dead-letters the message instead.
    assert seen == [(1, False), (2, True), (3, True)]
    assert await depths(oracle, queue, (200,)) == {**empty(queue, (200,)), f"{queue}.dlq": 1}
    assert app.outcomes[queue, "requeue"] == 3
    dead = await get_dead_letter(oracle, queue)
    assert dead.body == b"back and back"
    headers = dead.headers or {}
    assert headers["k"] == "v"
    # read with basic.get from the quorum .dlq: 0 before 4.0, none from 4.0
    count = 0 if get_shows_a_zero_count(broker_version) else None
    assert_dead_lettered_by_the_broker(headers, queue, broker_version, count)


async def test_lost_connections_reach_the_delivery_limit(
    broker_url: str,
    broker_version: tuple[int, int, int],
    broker_ctl: None,
    oracle: Oracle,
    names: Names,
) -> None:
    """On every version a message whose handler's connection is lost counts as a
    failed delivery: limit 1 dead-letters it at its second such loss (a consumer that
    crashes on a message cannot loop forever)."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[int, bool]] = []
    running = anyio.Event()
    never = anyio.Event()

    @app.consumer(queue, queue_type="quorum", delivery_limit=1, retry=RETRY, timeout=30.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.attempt, msg.redelivered))
        running.set()
        await never.wait()

    async with app.running():
        await oracle.publish(queue, b"crashes its consumer", headers={"k": "v"})
        for _ in range(2):
            with anyio.fail_after(DEADLINE):
                await running.wait()
            running = anyio.Event()
            await close_all_connections()
        await wait_for_count(oracle, f"{queue}.dlq", 1)

    assert seen == [(1, False), (2, True)]
    assert app.outcomes[queue, "cancelled"] == 2
    await assert_nothing_unacked(queue)
    dead = await get_dead_letter(oracle, queue)
    assert (dead.body, (dead.headers or {}).get("k")) == (b"crashes its consumer", "v")
    # read with basic.get from the quorum .dlq: 0 before 4.0; from 4.0 the two
    # lost connections it reached
    count = 0 if get_shows_a_zero_count(broker_version) else 2
    assert_dead_lettered_by_the_broker(dict(dead.headers or {}), queue, broker_version, count)


# -- 4. a retry copy starts afresh --------------------------------------------------------


async def test_retry_copy_does_not_carry_the_delivery_count(
    broker_url: str, broker_version: tuple[int, int, int], oracle: Oracle, names: Names
) -> None:
    """Requeued once, then failed: the retry copy starts afresh from its x-attempt and
    carries no x-delivery-count.

    Before 4.3 the requeue counted (x-delivery-count 1): the failure is attempt 2, it
    waits the second delay (0.2 s), and the copy is attempt 3 (4 had the count stuck).
    From 4.3 the requeue does not count: the failure is attempt 1, it waits the first
    delay (0.1 s), and the copy is attempt 2."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[int, bool, object, object, list[tuple[str, str]]]] = []
    done = anyio.Event()

    @app.consumer(queue, queue_type="quorum", retry=sc.Retry(delays=(0.1, 0.2)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        headers = msg.headers
        seen.append(
            (
                msg.attempt,
                msg.redelivered,
                headers.get("x-delivery-count"),
                headers.get("x-attempt"),
                _death(headers),
            )
        )
        if len(seen) == 1:
            raise sc.Requeue()
        if len(seen) == 2:
            raise ValueError("fails once")
        done.set()

    async with app.running():
        await oracle.publish(queue, b"retry me")
        with anyio.fail_after(DEADLINE):
            await done.wait()

        async def acked() -> bool:
            seen_by_ctl = await ctl_queue(queue)
            return seen_by_ctl is None or (seen_by_ctl.ready, seen_by_ctl.unacked) == (0, 0)

        await wait_until(acked, what="the copy acked")

    if nack_counts_as_delivery(broker_version):
        assert seen == [
            (1, False, None, None, []),
            (2, True, 1, None, []),
            # the copy: a new message to the quorum queue, back from <queue>.retry.200
            (3, False, None, 3, [(f"{queue}.retry.200", "expired")]),
        ]
    else:
        assert seen == [
            (1, False, None, None, []),
            (1, True, None, None, []),
            (2, False, None, 2, [(f"{queue}.retry.100", "expired")]),
        ]
    assert await depths(oracle, queue, RETRY_MS) == empty(queue, RETRY_MS)
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "requeue"] == 1
    assert app.outcomes[queue, "retry"] == 1
    assert app.outcomes[queue, "ack"] == 1


async def test_what_a_requeue_costs_of_the_retry_policy(
    broker_url: str, broker_version: tuple[int, int, int], oracle: Oracle, names: Names
) -> None:
    """With one retry delay: before 4.3 a requeue uses up an attempt, so a requeue and
    then a failure dead-letters (the failure is attempt 2 of 2); from 4.3 it does not,
    so the failure is retried once more first. The dead letter has the copy's
    headers, not the original's x-delivery-count."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[int] = []

    @app.consumer(queue, queue_type="quorum", retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append(msg.attempt)
        if len(seen) == 1:
            raise sc.Requeue()
        raise ValueError(f"fails on attempt {msg.attempt}")

    async with app.running():
        await oracle.publish(queue, b"requeued, then failed")
        await wait_for_count(oracle, f"{queue}.dlq", 1)
        await anyio.sleep(0.4)  # a retry would be back after 0.2 s

    assert seen == ([1, 2] if nack_counts_as_delivery(broker_version) else [1, 1, 2])
    assert await depths(oracle, queue, (200,)) == {**empty(queue, (200,)), f"{queue}.dlq": 1}
    await assert_nothing_unacked(queue)
    dead = await get_dead_letter(oracle, queue)
    headers = dead.headers or {}
    assert headers["x-error-type"] == "ValueError"
    assert headers["x-error-message"] == "fails on attempt 2"
    assert headers["x-attempt"] == 2
    assert headers["x-failed-queue"] == queue
    # the copy drops the original's count; the quorum .dlq's basic.get adds its 0
    # before 4.3
    assert "x-acquired-count" not in headers
    if get_shows_a_zero_count(broker_version):
        assert headers["x-delivery-count"] == 0
    else:
        assert "x-delivery-count" not in headers
    if nack_counts_as_delivery(broker_version):
        assert "x-death" not in headers  # the original failed twice
    else:
        # the retry copy failed: it came back through its retry queue
        assert _death(headers) == [(f"{queue}.retry.200", "expired")]


# -- 5. a lost connection counts too --------------------------------------------------------


async def test_redelivery_after_a_lost_connection_is_the_next_attempt(
    broker_url: str, broker_ctl: None, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[int, bool, object]] = []
    cancelled: list[int] = []
    waiting = anyio.Event()
    never = anyio.Event()
    done = anyio.Event()

    @app.consumer(queue, queue_type="quorum", retry=sc.Retry(delays=(0.2,)), timeout=30.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.attempt, msg.redelivered, msg.headers.get("x-delivery-count")))
        if len(seen) == 1:
            waiting.set()
            try:
                await never.wait()
            except anyio.get_cancelled_exc_class():
                cancelled.append(msg.attempt)
                raise
        done.set()

    async with app.running():
        await oracle.publish(queue, b"interrupted")
        with anyio.fail_after(DEADLINE):
            await waiting.wait()
        await close_all_connections()
        with anyio.fail_after(DEADLINE):
            await done.wait()
        assert app.reconnects == 1

        async def acked() -> bool:
            seen_by_ctl = await ctl_queue(queue)
            return seen_by_ctl is not None and (seen_by_ctl.ready, seen_by_ctl.unacked) == (0, 0)

        await wait_until(acked, what="the redelivery acked")

    assert seen == [(1, False, None), (2, True, 1)]
    assert cancelled == [1]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "ack"] == 1
    assert app.outcomes[queue, "cancelled"] == 1
