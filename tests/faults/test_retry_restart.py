"""A retried copy that waits in its retry queue while the node restarts.

Retry queues are quorum queues with at-least-once dead-lettering. Nobody consumes from
one and, once the App is gone, nobody publishes to it: the only thing that moves an
expired copy back to its queue is the timer the queue keeps for its head message. That
timer lives in the queue's leader process, not in its log, so a restart must set it
again: RabbitMQ 3.10 does it when the queue becomes leader, 4.x after the first batch
of commands the new leader applies. This test pins that on each release: the copy comes
back on time, with no consumer and no publish after the restart.

Broker behaviour only (the retry publish itself is tested on both backends elsewhere),
so it runs on trio alone; a private node (``own_node``), restarted once.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio.to_thread
import pytest

import strictconsume as sc

from ..amqp.oracle import Oracle
from ..conftest import dev_broker
from ..framework.polling import wait_until
from ..processes import Node

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.anyio, pytest.mark.timeout(300)]

#: Long enough for the node to stop and start again while the copy waits.
DELAY = 20.0


def restart(node: Node) -> None:
    dev_broker(*node.args, "stop")
    dev_broker(*node.args, "start")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_retry_waiting_through_a_node_restart_comes_back_on_its_own(
    anyio_backend: Any, own_node: Node
) -> None:
    oracle = Oracle(own_node.url)
    queue = f"sc-restart-{uuid.uuid4().hex}"
    retry_queue = f"{queue}.retry.{round(DELAY * 1000)}"
    attempts: list[int] = []
    app = sc.App(url=own_node.url, grace_period=2.0)

    @app.consumer(queue, retry=sc.Retry(delays=(DELAY,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            raise ValueError("fails once")

    async def copy_waiting() -> bool:
        return await oracle.message_count(retry_queue) == 1

    async with app.running():
        await oracle.publish(queue, b"m")
        await wait_until(copy_waiting, within=5, what="the copy in the retry queue")
    copied = time.monotonic()
    await anyio.to_thread.run_sync(restart, own_node)
    restarted = time.monotonic() - copied
    assert restarted < DELAY - 2, f"the restart took {restarted:.1f} s: too long for the test"
    assert await oracle.message_count(retry_queue) == 1, "the copy did not survive the restart"

    async def back_in_the_queue() -> bool:
        return await oracle.message_count(queue) == 1

    # Nobody consumes, nobody publishes: the queue's timer alone brings the copy back.
    await wait_until(back_in_the_queue, within=DELAY + 10, what="the copy back in its queue")
    waited = time.monotonic() - copied
    print(f"restart {restarted:.1f} s; the copy back {waited:.1f} s after it was queued")
    assert DELAY - 1 <= waited <= DELAY + 6, waited
    assert await oracle.message_count(retry_queue) == 0

    async def handled_again() -> bool:
        return attempts == [1, 2]

    async with app.running():
        await wait_until(handled_again, within=10, what="the retried copy handled")
