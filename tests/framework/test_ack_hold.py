"""The ack hold (``_acks.py``: :class:`AckHold`, ``ChannelAcks.acker``): how long a
finished message waits for others to share its ack, in proportion to how long the
handlers take.

The policy sans-IO, then the acker's flushes on trio's autojump clock (exact virtual
times) against a stand-in for the channel that records the acks queued, and on
asyncio in order.
"""

from __future__ import annotations

from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
import trio.testing

from strictconsume._acks import (
    ACK_DELAY,
    HOLD_SHARE,
    TIMER_RESOLUTION,
    AckHold,
    ChannelAcks,
    ack_batch,
)
from strictconsume.amqp import Channel

pytestmark = pytest.mark.anyio


def test_before_any_handler_finished_the_hold_is_the_ack_delay() -> None:
    assert AckHold().delay == ACK_DELAY


@pytest.mark.parametrize("duration", [0.0, 20e-6, 0.001, ACK_DELAY])
def test_short_handlers_keep_the_full_hold(duration: float) -> None:
    """Handlers up to ACK_DELAY on average keep the loop busy: batching is free."""
    hold = AckHold()
    for _ in range(200):
        hold.finished(duration)
    assert hold.delay == ACK_DELAY


@pytest.mark.parametrize(
    ("duration", "delay"),
    [
        (0.0025, 0.0),
        (0.010, 0.0),
        (0.040, 0.0),
        (0.060, 0.0012),
        (0.075, 0.0015),
        (0.100, ACK_DELAY),
        (5.0, ACK_DELAY),
    ],
)
def test_long_handlers_hold_a_share_of_their_duration_at_most_the_ack_delay(
    duration: float, delay: float
) -> None:
    """A share of the mean (HOLD_SHARE), at most ACK_DELAY, and none where it would be
    shorter than the loop's timers can wait (TIMER_RESOLUTION: 1 ms, a 50 ms mean)."""
    hold = AckHold()
    for _ in range(300):
        hold.finished(duration)
    assert hold.mean == pytest.approx(duration, rel=1e-4)
    assert hold.delay == pytest.approx(delay, rel=1e-3)
    assert hold.delay == 0.0 or TIMER_RESOLUTION <= hold.delay <= ACK_DELAY


def test_the_hold_follows_a_change_of_pace_within_a_few_dozen_messages() -> None:
    hold = AckHold()
    for _ in range(200):
        hold.finished(20e-6)  # no-op handlers
    assert hold.delay == ACK_DELAY
    for _ in range(40):
        hold.finished(0.012)  # now 12 ms each (a 10 ms sleep, late): no hold
    assert hold.delay == 0.0
    for _ in range(60):
        hold.finished(0.080)  # 80 ms each
    assert hold.delay == pytest.approx(HOLD_SHARE * 0.080, rel=0.1)
    for _ in range(80):
        hold.finished(20e-6)  # fast again
    assert hold.delay == ACK_DELAY


def test_one_slow_message_among_fast_ones_does_not_drop_the_hold_for_long() -> None:
    """A moving average: one 10 ms handler among no-op ones moves the mean by a
    sixteenth of it, not past ACK_DELAY."""
    hold = AckHold()
    for _ in range(100):
        hold.finished(20e-6)
    hold.finished(0.010)
    assert hold.mean < ACK_DELAY
    assert hold.delay == ACK_DELAY


class RecordingChannel:
    """What ``ChannelAcks`` uses of a channel: the acks queued, and when."""

    is_open = True

    def __init__(self) -> None:
        self.acks: list[tuple[float, int, bool]] = []

    def ack_nowait(self, delivery_tag: int, *, multiple: bool = False, batch: bool = False) -> None:
        self.acks.append((anyio.current_time(), delivery_tag, multiple))

    def send_queued(self) -> None:
        return  # the acks are recorded when queued

    writable = True

    async def wait_writable(self) -> None:
        return


def autojump_and_asyncio() -> pytest.MarkDecorator:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend",
        [
            pytest.param(("trio", {"clock": clock}), id="trio-autojump"),
            pytest.param("asyncio", id="asyncio"),
        ],
    )


@autojump_and_asyncio()
@pytest.mark.parametrize(
    ("duration", "expected_hold"),
    [(50e-6, ACK_DELAY), (0.010, 0.0), (0.075, HOLD_SHARE * 0.075), (0.200, ACK_DELAY)],
    ids=["noop", "10ms", "75ms", "200ms"],
)
async def test_a_lone_finished_message_waits_the_hold_for_its_ack(
    anyio_backend: Any, duration: float, expected_hold: float
) -> None:
    """Prefetch 100 (batches of 12): after 50 handlers of ``duration`` were acked (the
    mean settles), one more finishes alone with others still running: its ack is
    queued once the hold has passed, not at ACK_DELAY (10 ms handlers: at once, at
    the end of the scheduler round; 75 ms ones: 1.5 ms)."""
    ch = RecordingChannel()
    acks = ChannelAcks(cast(Channel, ch), prefetch=100)
    assert acks.ack_batch == ack_batch(100) == 12
    for tag in range(1, 53):
        acks.tracker.received(tag)
    async with anyio.create_task_group() as tg:
        tg.start_soon(acks.acker)
        for tag in range(1, 51):
            await acks.acked(tag, alone=False, duration=duration)
            if tag % 12 == 0:
                await anyio.lowlevel.checkpoint()  # a batch: the acker flushes at once
        await anyio.sleep(ACK_DELAY * 2)
        assert acks.hold.mean == pytest.approx(duration, rel=0.05)
        assert acks.tracker.pending == 0
        ch.acks.clear()
        finished = anyio.current_time()
        await acks.acked(51, alone=False, duration=duration)  # 52 still runs
        await anyio.sleep(ACK_DELAY * 2)
        tg.cancel_scope.cancel()
    [(when, tag, multiple)] = ch.acks
    assert (tag, multiple) == (51, False)
    hold = acks.hold.delay
    assert hold == pytest.approx(expected_hold, rel=0.05, abs=1e-9)
    waited = when - finished
    if isinstance(anyio_backend, tuple):
        assert waited == pytest.approx(hold)
    else:
        assert hold <= waited < hold + 0.05  # real time, on a loaded machine


@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}), id="trio")],
)
async def test_an_ack_without_a_duration_leaves_the_hold_as_it_was(anyio_backend: Any) -> None:
    """The ack of an original after its retry copy (no duration) is not a handler's
    end: the hold's mean stays that of the handlers."""
    ch = RecordingChannel()
    acks = ChannelAcks(cast(Channel, ch), prefetch=100)
    for tag in range(1, 3):
        acks.tracker.received(tag)
    await acks.acked(1, alone=False, duration=0.010)
    mean = acks.hold.mean
    await acks.acked(2, alone=False)
    assert acks.hold.mean == mean
