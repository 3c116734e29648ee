"""Settling a message that was not simply acked: requeued, or copied to its retry or
dead-letter queue (a confirmed publish) and then acked (design section 3).

Each settlement is bounded by :data:`~._acks.SETTLE_TIMEOUT`; a copy that could not be
published leaves the original requeued rather than acked, so the worst case is a
duplicate, never a loss. A copy that can never be published (it cannot be encoded,
or it is larger than the broker accepts) has its original rejected, for the broker to
dead-letter it as it is.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Protocol

import anyio
import attrs

from ._acks import SETTLE_TIMEOUT
from ._copies import copy_properties, dead_letter_headers, retry_headers
from ._outcome import Outcome, OutcomeKind, error_type
from ._publisher import COPIES
from ._retry import AD_HOC_LEASE_RENEWAL, dead_letter_queue_name, retry_queue_name
from ._topology import dead_letter_arguments, retry_arguments
from .amqp import AMQPError, ChannelClosed, ConnectionLost, MessageReturned

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from ._consumer import ConsumerSpec
    from ._message import Message
    from ._publisher import PublishChannelSlot
    from .amqp import Channel

__all__ = ["SETTLE_FAILURE_PAUSE", "ChannelSettling", "Settlement"]

logger = logging.getLogger("strictconsume")

#: Seconds to hold a message whose copy could not be published before requeueing it,
#: so that a broker refusing every copy does not turn into a busy redelivery loop.
SETTLE_FAILURE_PAUSE = 1.0


class ChannelSettling(Protocol):
    """The channel a message came on, as a settlement uses it."""

    @property
    def ch(self) -> Channel: ...

    async def acked(self, delivery_tag: int) -> None:
        """Ack it, coalesced with others."""

    async def requeue(self, delivery_tag: int) -> None:
        """Nack it with requeue."""

    async def reject(self, delivery_tag: int) -> None:
        """Nack it without requeue (the broker dead-letters it)."""


@attrs.define(eq=False)
class Settlement:
    """Settles the messages of one consumer that were not simply acked."""

    spec: ConsumerSpec
    #: The channel copies are published on (set by the dispatcher for each run).
    publishing: PublishChannelSlot = attrs.field(init=False)
    #: When this consumer last declared each ad-hoc retry queue (a bounded set).
    leases: dict[str, float] = attrs.Factory(dict)

    @property
    def queue(self) -> str:
        return self.spec.queue

    async def settle(self, state: ChannelSettling, msg: Message, outcome: Outcome) -> Outcome:
        """Carry out ``outcome``; returns what was actually done."""
        tag = msg.delivery_tag
        kind = outcome.kind
        if kind is OutcomeKind.REQUEUE:
            await state.requeue(tag)
            return outcome
        published = False
        connection_lost = False  # the publishing connection broke: no refusal
        with anyio.move_on_after(SETTLE_TIMEOUT):
            try:
                if kind is OutcomeKind.RETRY:
                    await self._publish_retry(msg, outcome)
                else:
                    await self._publish_dead_letter(msg, outcome)
                published = True
            except AMQPError as exc:
                if isinstance(exc, ChannelClosed) and exc.message_too_large:
                    # over the broker's max_message_size: no retry will help
                    return await self._reject_uncopyable(state, msg, exc)
                connection_lost = isinstance(exc, ConnectionLost)
                logger.error(
                    "queue %r: could not publish message %r (delivery_tag %d) to its %s "
                    "queue: %s; it goes back to the queue",
                    self.queue,
                    msg.message_id,
                    tag,
                    "retry" if kind is OutcomeKind.RETRY else "dead-letter",
                    exc,
                )
            except ValueError as exc:  # the copy cannot be encoded: no retry will help
                return await self._reject_uncopyable(state, msg, exc)
        if not published:
            if state.ch.is_open and not connection_lost:  # refused or no confirm in time
                await anyio.sleep(SETTLE_FAILURE_PAUSE)
            # (on a closed channel the broker requeues it itself; and a lost publishing
            # connection is no refusal: its loss often comes with the consumers' own,
            # whose reconnect this shielded pause would hold up)
            await state.requeue(tag)
            return Outcome(OutcomeKind.REQUEUE, error_type=outcome.error_type)
        await state.acked(tag)
        return outcome

    async def _reject_uncopyable(
        self, state: ChannelSettling, msg: Message, exc: Exception
    ) -> Outcome:
        """A copy of ``msg`` can never be published (it cannot be encoded, or it is
        larger than the broker accepts): reject the original, so that the broker
        dead-letters it as it is, instead of requeueing it forever."""
        logger.error(
            "queue %r: message %r (delivery_tag %d) cannot be copied: %s; it is "
            "rejected, so the broker dead-letters it as it is (without x-error "
            "headers)",
            self.queue,
            msg.message_id,
            msg.delivery_tag,
            exc,
        )
        await state.reject(msg.delivery_tag)
        return Outcome(OutcomeKind.DEAD_LETTER, error_type=error_type(exc))

    async def _publish_retry(self, msg: Message, outcome: Outcome) -> None:
        delay = outcome.delay
        assert delay is not None
        queue = retry_queue_name(self.queue, delay)
        arguments = retry_arguments(self.spec, delay)
        if self.spec.retry.is_ad_hoc(delay):
            # An ad-hoc queue expires when unused; publishing does not renew its
            # lease, declaring does: declare it when our last declaration is old.
            now = anyio.current_time()
            if now - self.leases.get(queue, -math.inf) >= AD_HOC_LEASE_RENEWAL:
                await self.publishing.declare_queue(
                    queue, arguments, durable=self.spec.durable, purpose=COPIES
                )
                self.leases[queue] = now
        await self._publish_copy(msg, queue, arguments, retry_headers(msg))

    async def _publish_copy(
        self, msg: Message, queue: str, arguments: FieldTable | None, headers: FieldTable
    ) -> None:
        """Publish a confirmed copy of ``msg`` to ``queue``; when no such queue exists
        (a delay outside the policy, or a queue deleted on the broker) declare it and
        publish once more."""
        publishing = self.publishing
        publish = functools.partial(
            publishing.publish,
            msg.body,
            purpose=COPIES,
            exchange="",
            routing_key=queue,
            properties=copy_properties(msg.properties, headers),
            mandatory=True,
        )
        try:
            await publish()
        except MessageReturned:
            await publishing.declare_queue(
                queue, arguments, durable=self.spec.durable, purpose=COPIES
            )
            await publish()

    async def _publish_dead_letter(self, msg: Message, outcome: Outcome) -> None:
        await self._publish_copy(
            msg,
            dead_letter_queue_name(self.queue),
            dead_letter_arguments(self.spec),
            dead_letter_headers(msg, outcome),
        )
