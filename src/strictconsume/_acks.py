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
"""

from __future__ import annotations

import bisect

import attrs

__all__ = ["Ack", "AckTracker"]


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
