"""A memory alarm held for 60 s while handlers publish: nothing lost, nothing left
unacked, the ack count exact (issue 14, defect 1).

In a memory or disk alarm RabbitMQ stops reading from every connection that
publishes. Handlers here publish (a quarter of them a 128 KiB message through
``app.publisher()``, another quarter fail once so that their retry copy is published),
the rest only return. Before the fix the copies and ``app.publisher()`` shared the
consumers' connection: once more than ``WRITE_HIGH_WATER`` waited for the blocked
socket, a flush of acks gave up after ``SETTLE_TIMEOUT`` and forgot the acks it had
not queued, so those messages stayed unacked for good. Now publishing has a
connection of its own and the consumers' acks keep flowing.

The broker is a private node (``own_node``): the alarm would stall other tests. pika
is the oracle for what the queues hold; ``rabbitmqctl`` for what is unacked.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import anyio
import anyio.to_thread
import pika
import pytest

import strictconsume as sc
from strictconsume._topology import queue_arguments

from ..amqp.oracle import Oracle, pika_channel
from ..conftest import dev_broker
from ..framework.polling import wait_until
from ..processes import Node

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.anyio, pytest.mark.timeout(300)]

TOTAL = 400
PREFETCH = 64
ALARM = 60.0
#: The body a publishing handler sends: 48 of them in flight exceed WRITE_HIGH_WATER.
OUT_BODY = b"x" * (128 * 1024)
RETRY = sc.Retry(delays=(0.5,))


def publish_all(url: str, queue: str, total: int) -> None:
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        for n in range(total):
            ch.basic_publish(
                "", queue, str(n).encode(), pika.BasicProperties(delivery_mode=2), mandatory=True
            )


def ctl(node: Node, *args: str) -> str:
    return dev_broker(*node.args, "ctl", *args).stdout


def queue_counts(node: Node, queue: str) -> tuple[int, int]:
    """(ready, unacked) of ``queue``, by rabbitmqctl."""
    out = ctl(node, "list_queues", "name", "messages_ready", "messages_unacknowledged", "-q")
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"rabbitmqctl does not list {queue!r}:\n{out}")


def set_alarm(node: Node, on: bool) -> None:
    ctl(node, "set_vm_memory_high_watermark", "0.000001" if on else "0.4")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        raised = "Memory alarm on node" in ctl(node, "status")
        if raised == on:
            return
        time.sleep(0.2)
    raise AssertionError(f"the memory alarm is still {'off' if on else 'on'} after 20 s")


async def test_a_memory_alarm_of_60_s_while_handlers_publish(
    anyio_backend: Any, own_node: Node
) -> None:
    url = own_node.url
    oracle = Oracle(url)
    queue = f"alarm-{uuid.uuid4().hex[:8]}"
    out = f"{queue}.out"
    successes: Counter[int] = Counter()
    published: Counter[int] = Counter()

    app = sc.App(url=url, prefetch=PREFETCH, grace_period=5.0)

    @app.consumer(queue, retry=RETRY, timeout=None)
    async def handle(msg: sc.Message) -> None:
        n = int(msg.body)
        if n % 4 == 0:
            async with app.publisher() as pub:
                await pub.publish(OUT_BODY, routing_key=out, message_id=str(n))
            published[n] += 1
        elif n % 4 == 1 and msg.attempt == 1:
            raise ValueError("fails once: its retry copy is published")
        successes[n] += 1

    [spec] = app.consumers
    await oracle.declare_durable(queue, dict(queue_arguments(spec)))
    await oracle.declare_durable(out, None)
    await anyio.to_thread.run_sync(publish_all, url, queue, TOTAL)
    await anyio.to_thread.run_sync(set_alarm, own_node, True)
    alarm_on = time.monotonic()
    during: dict[str, Any] = {}
    try:
        async with app.running():
            await anyio.sleep(ALARM - 5)
            during["acks"] = app.outcomes[(queue, "ack")]
            during["counts"] = await anyio.to_thread.run_sync(queue_counts, own_node, queue)
            await anyio.sleep(alarm_on + ALARM - time.monotonic())
            await anyio.to_thread.run_sync(set_alarm, own_node, False)
            lifted = time.monotonic()

            async def all_handled() -> bool:
                return len(successes) == TOTAL

            await wait_until(all_handled, within=60, what=f"{TOTAL} messages handled")
            drained_after = time.monotonic() - lifted

            async def settled() -> bool:
                counts = await anyio.to_thread.run_sync(queue_counts, own_node, queue)
                return counts == (0, 0)

            await wait_until(settled, within=20, what=f"{queue!r} empty and nothing unacked")
            acks = app.outcomes[(queue, "ack")]
    finally:
        await anyio.to_thread.run_sync(set_alarm, own_node, False)
    duplicates = sum(successes.values()) - TOTAL
    print(
        f"alarm {ALARM:g} s: {during['acks']} acks during it, (ready, unacked) 5 s before "
        f"it lifted {during['counts']}; every message handled {drained_after:.2f} s "
        f"after; acks {acks}, duplicates {duplicates}, outcomes {dict(app.outcomes)}"
    )
    # Every message was handled, and each successful run acked exactly once.
    assert set(successes) == set(range(TOTAL))
    assert acks == sum(successes.values())
    # Every ack counted during the alarm had reached the broker during the alarm
    # (none stuck behind the blocked publishes); the window then held the handlers
    # waiting to publish and the messages whose copy waited.
    ready, unacked = during["counts"]
    assert ready + unacked == TOTAL - during["acks"]
    assert unacked <= PREFETCH
    # Every publishing handler's message is in .out, once per successful run.
    assert await oracle.message_count(out) == sum(published.values())
    assert set(published) == {n for n in range(TOTAL) if n % 4 == 0}
    assert await oracle.message_count(f"{queue}.dlq") == 0
    assert await oracle.message_count(f"{queue}.retry.500") == 0
