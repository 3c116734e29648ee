"""Regression tests for issue 14: the paths that must never lose or stall a message.

Each test fails on the code before its fix (named in the commit that adds it):

1. a flush whose socket stays backed up past ``SETTLE_TIMEOUT`` still sends every ack
   it took from the tracker (fake broker, autojump clock);
2. more in later commits.

Timing runs on trio's autojump clock and asserts virtual times; what the broker
does is pinned against the scripted fake broker of ``tests/amqp/fake_broker.py``.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import trio.testing
from pamqp import commands

from strictconsume._dispatch import SETTLE_TIMEOUT, _ChannelState
from strictconsume.amqp import ConnectionParameters, connect_stream

from ..amqp.fake_broker import FakeBroker, pair

pytestmark = pytest.mark.anyio

PARAMS = ConnectionParameters(host="rabbit", username="alice", password="pw-14", vhost="shop")


def autojump() -> pytest.MarkDecorator:
    """Run on trio only, with a MockClock that jumps whenever every task is blocked."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-autojump")]
    )


# -- 1. acks taken from the tracker are never dropped -----------------------------------------


@autojump()
async def test_acks_taken_while_the_socket_is_backed_up_are_all_sent(anyio_backend: Any) -> None:
    """The broker stops reading for 60 s (a blocked connection) while 10 MiB wait for
    the socket. A flush takes ack(1) and ack(3) (3 is above the gap at 2): both must
    reach the broker once it reads again, although the flush's bounded wait ended long
    before. The old flush queued ack(1), waited, gave up after SETTLE_TIMEOUT and
    forgot ack(3): the broker never got it."""
    client, broker = pair(client_buffer=0)  # the client's writes wait for the broker
    big = b"x" * (5 * 1024 * 1024)  # twice: more than WRITE_HIGH_WATER stays queued
    acks: list[tuple[int, bool]] = []
    flushed_after: list[float] = []
    all_read = anyio.Event()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await anyio.sleep(60)  # not reading: the client's socket is full
        for _ in range(2):
            await broker.expect_publish(1)
        while len(acks) < 2:
            ack = await broker.expect(commands.Basic.Ack, 1)
            acks.append((ack.delivery_tag, ack.multiple))
        all_read.set()
        await broker.close_channel(1)
        await broker.close_connection()

    with anyio.fail_after(300):
        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.serve, script)
            async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
                await ch.publish(big, routing_key="a")
                await anyio.wait_all_tasks_blocked()  # the writer is stuck sending "a"
                await ch.publish(big, routing_key="b")  # queued in the client
                state = _ChannelState(ch, prefetch=8, concurrency=None)
                for tag in (1, 2, 3):
                    state.tracker.received(tag)
                state.tracker.finished(1)
                state.tracker.finished(3)
                t0 = anyio.current_time()
                await state.flush()
                flushed_after.append(anyio.current_time() - t0)
                assert not state.tracker.pending
                await all_read.wait()
    assert flushed_after == [SETTLE_TIMEOUT]  # a bounded wait, not one per ack
    assert acks == [(1, False), (3, False)]
