"""The ack tracker: which delivery tags of one channel to acknowledge, and how.

RabbitMQ numbers the deliveries of a channel 1, 2, 3, ... and ``basic.ack`` with
``multiple=True`` settles every unsettled tag up to the one given. Handlers finish in
any order, so the tracker keeps, per channel, the tags received and not yet settled,
in order, and the tags finished since the last flush. A flush (run once per batch of
finished handlers) turns them into frames:

- the contiguous prefix of settled tags at the bottom of the window is settled by
  one ``ack(highest finished tag in it, multiple=True)``, or a single ack when it
  holds only one finished tag;
- finished tags above a gap (a lower tag still running) are acked singly, at once,
  so that a slow message never holds back the rest of the prefetch window;
- nacks and rejects are sent singly by the dispatcher when they happen; the tracker
  only learns that those tags are settled (so that a later multiple-ack may cover
  them: the broker ignores tags that are no longer unacked).

A multiple-ack never covers a tag that is still running: every tag below the
acknowledged one is either finished or already settled. A tracker belongs to one
channel; a replaced channel gets a new tracker, so no tag crosses a channel's life.
"""

from __future__ import annotations

from collections import deque

import attrs

__all__ = ["Ack", "AckTracker"]


@attrs.frozen
class Ack:
    """One basic.ack to send."""

    delivery_tag: int
    multiple: bool = False


@attrs.define
class AckTracker:
    """Per-channel bookkeeping of unsettled delivery tags (sans-IO)."""

    #: Tags received and not yet known to be settled on the broker, ascending.
    _window: deque[int] = attrs.field(factory=deque, init=False)
    #: Finished tags not yet acked.
    _finished: set[int] = attrs.field(factory=set, init=False)
    #: Tags settled (acked singly, nacked, rejected) but still inside the window.
    _settled: set[int] = attrs.field(factory=set, init=False)
    #: Tags received whose handler has not finished and that are not settled.
    _running: set[int] = attrs.field(factory=set, init=False)
    _last_received: int = attrs.field(default=0, init=False)

    def received(self, delivery_tag: int) -> None:
        """A delivery with this tag was handed to a handler."""
        if delivery_tag <= self._last_received:
            raise ValueError(
                f"delivery tags must increase: {delivery_tag} after {self._last_received}"
            )
        self._last_received = delivery_tag
        self._window.append(delivery_tag)
        self._running.add(delivery_tag)

    def finished(self, delivery_tag: int) -> None:
        """The handler of this tag finished and its message is to be acked."""
        self._check_unsettled(delivery_tag)
        self._finished.add(delivery_tag)

    def settled(self, delivery_tag: int) -> None:
        """This tag was settled by a nack or reject sent elsewhere."""
        self._check_unsettled(delivery_tag)
        self._settled.add(delivery_tag)
        self._trim()

    @property
    def unsettled(self) -> int:
        """How many received tags are neither acked nor otherwise settled."""
        return len(self._window) - len(self._settled)

    @property
    def pending(self) -> int:
        """How many finished tags :meth:`flush` would ack (true when it has acks)."""
        return len(self._finished)

    def flush(self) -> list[Ack]:
        """The acks that settle every finished tag, coalesced where possible."""
        if not self._finished:
            return []
        acks: list[Ack] = []
        window, finished, settled = self._window, self._finished, self._settled
        highest = 0
        count = 0
        while window and (window[0] in finished or window[0] in settled):
            tag = window.popleft()
            if tag in finished:
                finished.discard(tag)
                highest = tag
                count += 1
            else:
                settled.discard(tag)
        if count:
            acks.append(Ack(highest, multiple=count > 1))
        for tag in sorted(finished):  # above a gap: singly, now
            acks.append(Ack(tag))
            settled.add(tag)
        finished.clear()
        return acks

    def _trim(self) -> None:
        window, settled = self._window, self._settled
        while window and window[0] in settled:
            settled.discard(window.popleft())

    def _check_unsettled(self, delivery_tag: int) -> None:
        try:
            self._running.remove(delivery_tag)
        except KeyError:
            raise ValueError(f"delivery tag {delivery_tag} is not awaiting settlement") from None
