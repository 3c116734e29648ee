"""The ack tracker: which delivery tags of one channel to acknowledge, and how.

RabbitMQ numbers the deliveries of a channel 1, 2, 3, ... and ``basic.ack`` with
``multiple=True`` settles every unsettled tag up to the one given. Handlers finish in
any order, so the tracker keeps, per channel, the tags whose handler still runs and
the tags finished since the last flush, and nothing else: its size is bounded by the
prefetch window, not by how many messages went past a slow one. A flush (run once
per batch of finished handlers) turns the finished tags into frames:

- the finished tags below the lowest running tag are settled by one
  ``ack(highest of them, multiple=True)``, or a single ack when there is only one:
  every tag below that one is finished or settled already (acked singly, nacked or
  rejected), and the broker ignores those that are no longer unacked;
- finished tags above a gap (a lower tag still running) are acked singly, at once,
  so that a slow message never holds back the rest of the prefetch window, and
  forgotten;
- nacks and rejects are sent singly by the dispatcher when they happen; the tracker
  only forgets those tags.

A multiple-ack never covers a tag that is still running, and the tag it names is
always one that is unacked on the broker (finished, not yet acked). A tracker belongs
to one channel; a replaced channel gets a new tracker, so no tag crosses a channel's
life.

:class:`ChannelAcks` is the I/O around a tracker: the acker task that decides when
to flush (design section 4), and the nacks, sent at once.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import anyio
import attrs

from .amqp import AMQPError, Flag

if TYPE_CHECKING:
    from .amqp import Channel

__all__ = [
    "ACK_DELAY",
    "HOLD_SHARE",
    "SETTLE_TIMEOUT",
    "TIMER_RESOLUTION",
    "Ack",
    "AckHold",
    "AckTracker",
    "ChannelAcks",
    "ack_batch",
]

logger = logging.getLogger("strictconsume")

#: Seconds a settlement (a retry or dead-letter publish and its confirm, then the ack)
#: may take before the original is requeued instead.
SETTLE_TIMEOUT = 10.0

#: Seconds a finished message may wait for others to share its ack (design section 4).
ACK_DELAY = 0.002

#: For handlers that take longer than :data:`ACK_DELAY` on average, the share of their
#: mean duration a finished message may wait for its ack instead (see :class:`AckHold`).
HOLD_SHARE = 0.02

#: Seconds below which a hold is no hold at all: the event loop's timers wake from
#: epoll, whose timeout CPython rounds up to whole milliseconds, so a shorter wait on
#: an idle loop lasts a millisecond anyway. A finished message is then acked once the
#: handlers that finished in the same scheduler round have run.
TIMER_RESOLUTION = 0.001

#: The weight of the latest handler duration in :attr:`AckHold.mean` (about the last
#: 16 messages count).
HOLD_WEIGHT = 1 / 16


@attrs.frozen
class Ack:
    """One basic.ack to send."""

    delivery_tag: int
    multiple: bool = False


@attrs.define
class AckTracker:
    """Per-channel bookkeeping of unsettled delivery tags (sans-IO), in memory
    proportional to the prefetch window."""

    #: Tags received whose handler has not finished and that are not settled.
    _running: set[int] = attrs.field(factory=set, init=False)
    #: Finished tags not yet acked.
    _finished: set[int] = attrs.field(factory=set, init=False)
    _last_received: int = attrs.field(default=0, init=False)

    def received(self, delivery_tag: int) -> None:
        """A delivery with this tag was handed to a handler."""
        if delivery_tag <= self._last_received:
            raise ValueError(
                f"delivery tags must increase: {delivery_tag} after {self._last_received}"
            )
        self._last_received = delivery_tag
        self._running.add(delivery_tag)

    def finished(self, delivery_tag: int) -> None:
        """The handler of this tag finished and its message is to be acked."""
        self._check_unsettled(delivery_tag)
        self._finished.add(delivery_tag)

    def settled(self, delivery_tag: int) -> None:
        """This tag was settled by a nack or reject sent elsewhere."""
        self._check_unsettled(delivery_tag)

    @property
    def unsettled(self) -> int:
        """How many received tags are neither acked nor otherwise settled."""
        return len(self._running) + len(self._finished)

    @property
    def pending(self) -> int:
        """How many finished tags :meth:`flush` would ack (true when it has acks)."""
        return len(self._finished)

    @property
    def size(self) -> int:
        """How many tags the tracker holds (at most the prefetch window)."""
        return len(self._running) + len(self._finished)

    def flush(self) -> list[Ack]:
        """The acks that settle every finished tag, coalesced where possible."""
        finished = self._finished
        if not finished:
            return []
        lowest_running = min(self._running, default=None)
        done = sorted(finished)
        finished.clear()
        if lowest_running is None:
            below, above = done, []
        else:
            split = bisect.bisect_left(done, lowest_running)
            below, above = done[:split], done[split:]
        acks: list[Ack] = []
        if below:
            acks.append(Ack(below[-1], multiple=len(below) > 1))
        acks.extend(Ack(tag) for tag in above)  # above a gap: singly, now
        return acks

    def _check_unsettled(self, delivery_tag: int) -> None:
        try:
            self._running.remove(delivery_tag)
        except KeyError:
            raise ValueError(f"delivery tag {delivery_tag} is not awaiting settlement") from None


def ack_batch(prefetch: int) -> int:
    """How many finished messages are acked at once without waiting for
    :data:`ACK_DELAY`: an eighth of the prefetch window (1 below a prefetch of 16).

    Acking each message as it finishes makes the broker refill the window one or two
    messages at a time, and the consumer spends its time on small reads and writes
    (0.7 ack frames per message at prefetch 100); a batch lets the broker send a
    burst. An eighth keeps the window at least 7/8 full while a batch gathers. Below
    a prefetch of 16 the window is too small to hold messages back: what finished in
    one scheduler round is acked at the end of it.
    """
    return max(1, prefetch // 8)


@attrs.define
class AckHold:
    """How long a finished message may wait for others to share its ack (sans-IO).

    Holding acks lets the broker refill the window in bursts, which pays while the
    handlers keep the loop busy: short handlers (a mean duration up to
    :data:`ACK_DELAY`) finish at the loop's pace, a batch fills within the hold, and
    a message held costs the consumer nothing, since others wait their turn anyway.
    They keep :data:`ACK_DELAY`. Handlers that wait (I/O, a sleep) leave the loop idle
    and the window, not the CPU, bounds the throughput: every moment a finished
    message waits for its ack is a moment its slot of the prefetch window does no
    work (at a 10 ms handler and prefetch 100, the 2 ms hold was about a fourteenth
    of a slot's cycle). They get :data:`HOLD_SHARE` of their mean duration, at most
    :data:`ACK_DELAY`, and none where that is below :data:`TIMER_RESOLUTION` (a wait
    the loop cannot keep that short): up to 50 ms handlers their acks go out once per
    scheduler round, with the others that finished in it; 1 ms at 50 ms, the full
    2 ms from 100 ms on.

    The mean is a moving average of the durations of the handlers acked (each weighs
    :data:`HOLD_WEIGHT`), so a consumer whose handlers change pace follows within a
    few dozen messages; before the first, the hold is :data:`ACK_DELAY`.
    """

    #: Recent mean duration of the handlers acked, in seconds.
    mean: float = 0.0

    def finished(self, duration: float) -> None:
        """A handler that took ``duration`` seconds finished and is to be acked."""
        self.mean += (duration - self.mean) * HOLD_WEIGHT

    @property
    def delay(self) -> float:
        """Seconds a finished message may wait for its batch."""
        mean = self.mean
        if mean <= ACK_DELAY:
            return ACK_DELAY
        hold = HOLD_SHARE * mean
        if hold < TIMER_RESOLUTION:
            return 0.0
        return min(ACK_DELAY, hold)


class ChannelAcks:
    """The acks and nacks of one channel: a tracker, and when to flush it."""

    def __init__(self, ch: Channel, prefetch: int) -> None:
        self.ch = ch
        self.tracker = AckTracker()
        self.ack_batch = ack_batch(prefetch)
        self.hold = AckHold()
        self.ack_wanted = Flag()
        self.batch_full = Flag()

    async def acker(self) -> None:
        """Flush once the handlers that finished in a scheduler round have all run: at
        once for a batch of :attr:`ack_batch` or more, else up to the hold's
        :attr:`~AckHold.delay` (:data:`ACK_DELAY` at most) later, unless a batch fills
        meanwhile (design section 4)."""
        while True:
            await self.ack_wanted.take()
            delay = self.hold.delay
            if delay and self.tracker.pending < self.ack_batch:
                self.batch_full.clear()
                with anyio.move_on_after(delay):
                    await self.batch_full.wait()
            await self.flush()

    async def acked(self, delivery_tag: int, *, alone: bool, duration: float | None = None) -> None:
        """The message of ``delivery_tag`` is done: ack it, coalesced with others
        (at once when ``alone``: no other handler runs, so no batch to wait for).
        ``duration``: how long its handler ran, for the hold (None: not a handler's
        end, e.g. the ack after a retry copy)."""
        tracker = self.tracker
        tracker.finished(delivery_tag)
        if duration is not None:
            self.hold.finished(duration)
        if self.ack_batch == 1 and alone:
            await self.flush()  # nothing else running: no batch to wait for
            return
        self.ack_wanted.set()
        if tracker.pending >= self.ack_batch:
            self.batch_full.set()

    async def flush(self) -> None:
        """Send the acks the tracker has ready, in order.

        Every ack taken from the tracker is queued for the socket before anything
        is awaited, so acks go out in the order taken and none is ever dropped: a
        socket that stays backed up (a broker that stopped reading) delays them, it
        never loses them. They are handed to the socket from this task when the
        connection's writer is idle (``Channel.send_queued``): the broker has them one
        scheduler round sooner, which at a prefetch of 1 is the next delivery sooner.
        Only when the socket is backed up, one wait, shielded and bounded by
        :data:`SETTLE_TIMEOUT`, lets the writer drain the backlog (backpressure for
        the handlers that follow).
        """
        if not self.tracker.pending:
            return
        ch = self.ch
        try:
            while acks := self.tracker.flush():
                if not ch.is_open:
                    return  # the broker requeues everything of a closed channel
                for ack in acks:
                    ch.ack_nowait(ack.delivery_tag, multiple=ack.multiple, batch=True)
            ch.send_queued()
            if ch.writable:
                return
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + SETTLE_TIMEOUT
                await ch.wait_writable()
        except AMQPError as exc:
            logger.debug("acks not sent: %s", exc)

    async def requeue(self, delivery_tag: int) -> None:
        """Nack with requeue: the message goes back to its queue."""
        await self._nack(delivery_tag, requeue=True)

    async def reject(self, delivery_tag: int) -> None:
        """Nack without requeue: the broker dead-letters it (the queue's DLX arguments)."""
        await self._nack(delivery_tag, requeue=False)

    async def _nack(self, delivery_tag: int, *, requeue: bool) -> None:
        self.tracker.settled(delivery_tag)
        if not self.ch.is_open:
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + SETTLE_TIMEOUT
            try:
                await self.ch.nack(delivery_tag, requeue=requeue)
            except AMQPError as exc:
                logger.debug("nack of %d not sent: %s", delivery_tag, exc)
