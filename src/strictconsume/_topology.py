"""Declaring what a consumer needs on the broker: exchanges, bindings, the queue, its
retry queues and its dead-letter queue (the layout is described in :mod:`._retry`).

Declarations are idempotent, so they run again after every reconnect and before a
resubscribe (the queue may have been deleted). A declaration that conflicts with what
the broker has (406 PRECONDITION_FAILED: a queue that exists with other arguments) is
a :class:`TopologyError`, worded to say which queue and what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._retry import (
    ad_hoc_queue_arguments,
    dead_letter_queue_name,
    main_queue_arguments,
    retry_queue_arguments,
    retry_queue_name,
)
from .amqp import ChannelClosed

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from ._consumer import ConsumerSpec
    from .amqp import Channel

__all__ = [
    "QUORUM_DEAD_LETTER_ARGUMENTS",
    "QUORUM_RETRY_ARGUMENTS",
    "TopologyError",
    "dead_letter_arguments",
    "declare_consumer",
    "declared_durable",
    "queue_arguments",
    "retry_arguments",
]


class TopologyError(Exception):
    """The broker refused a declaration: the queue or exchange exists with different
    settings (406), or the user may not declare it (403)."""

    def __init__(self, what: str, error: ChannelClosed, *, mismatch: str | None = None) -> None:
        self.error = error
        self.reply_code = error.reply_code
        if error.reply_code == 406 and mismatch is not None:
            advice = (
                f"{what} exists on the broker with different settings "
                f"({error.reply_text}). {mismatch}"
            )
        elif error.reply_code == 406:
            advice = (
                f"{what} exists on the broker with different settings ({error.reply_text}). "
                "Change the consumer's options to match, or delete it on the broker "
                "(its messages go with it) so that it is declared afresh"
            )
        elif error.reply_code == 403:
            advice = (
                f"the broker refused to declare {what} ({error.reply_text}); give the "
                "user configure permission on it, or declare it beforehand"
            )
        else:
            advice = f"the broker refused to declare {what}: {error}"
        super().__init__(advice)


def queue_arguments(spec: ConsumerSpec) -> FieldTable:
    """The arguments the consumer's queue is declared with."""
    arguments: FieldTable = dict(spec.arguments or {})
    arguments.update(main_queue_arguments(spec.queue))
    if spec.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    limit = spec.effective_delivery_limit
    if limit is not None:
        arguments["x-delivery-limit"] = limit
    return arguments


#: What a quorum consumer's dead-letter queue adds to its arguments. It is a quorum
#: queue too: a classic queue lives on one node, and with that node down the consumer
#: could not declare it again on another, so it could not fail over.
QUORUM_DEAD_LETTER_ARGUMENTS: FieldTable = {"x-queue-type": "quorum"}
#: What every consumer's retry queues add to their arguments, classic consumers' too.
#: A retry queue hands its messages back to the main queue through the broker's
#: dead-lettering, which is at-most-once from a classic queue: a main queue that
#: refuses the message then (a length limit with ``reject-publish``, its node down)
#: would lose it. A quorum queue with at-least-once dead-lettering (RabbitMQ 3.10+,
#: which needs ``x-overflow=reject-publish``) keeps the message until the main queue,
#: of whatever type, has confirmed it. Quorum queues are durable, whatever the
#: consumer's ``durable``.
QUORUM_RETRY_ARGUMENTS: FieldTable = {
    "x-queue-type": "quorum",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def declared_durable(spec: ConsumerSpec, arguments: FieldTable | None) -> bool:
    """Whether the consumer declares a queue with ``arguments`` durable: a quorum
    queue (every retry queue) always is, whatever the consumer's ``durable``."""
    return spec.durable or (arguments or {}).get("x-queue-type") == "quorum"


def dead_letter_arguments(spec: ConsumerSpec) -> FieldTable | None:
    """The arguments of the consumer's dead-letter queue (None: a plain queue)."""
    return dict(QUORUM_DEAD_LETTER_ARGUMENTS) if spec.queue_type == "quorum" else None


def retry_arguments(spec: ConsumerSpec, delay: float) -> FieldTable:
    """The arguments of the consumer's retry queue for ``delay`` seconds (an ad-hoc
    one, outside the policy, expires when unused)."""
    arguments = dict(retry_queue_arguments(spec.queue, delay))
    if spec.retry.is_ad_hoc(delay):
        arguments.update(ad_hoc_queue_arguments(delay))
    arguments.update(QUORUM_RETRY_ARGUMENTS)
    return arguments


def retry_queue_mismatch(name: str, queue: str) -> str:
    """What to do when the retry queue ``name`` exists with other arguments (an
    earlier version declared retry queues as classic queues). It holds copies on
    their way back to ``queue``, which it still moves there once nothing publishes
    to it: deleted empty, it loses nothing."""
    return (
        f"It holds retried copies on their way back to {queue!r}: stop every consumer "
        f"of {queue!r}, wait for them to go back (its delay at most), delete it while "
        f"empty with `rabbitmqctl delete_queue {name} --if-empty`, and start again "
        "(retry queues are quorum queues with at-least-once dead-lettering; earlier "
        "versions of strictconsume declared classic ones)"
    )


async def declare_consumer(ch: Channel, spec: ConsumerSpec) -> None:
    """Declare everything ``spec`` consumes from, in an order where each piece exists
    before something refers to it. On error the channel is closed by the broker.

    Raises:
        TopologyError: the broker refused a declaration (406 or 403 and others).
    """
    queue = spec.queue
    what = f"the dead-letter queue {dead_letter_queue_name(queue)!r}"
    mismatch: str | None = None
    try:
        dlq_arguments = dead_letter_arguments(spec)
        await ch.queue_declare(
            dead_letter_queue_name(queue), durable=spec.durable, arguments=dlq_arguments
        )
        for delay in sorted(set(spec.retry.delays)):
            name = retry_queue_name(queue, delay)
            what = f"the retry queue {name!r}"
            mismatch = retry_queue_mismatch(name, queue)
            arguments = retry_arguments(spec, delay)
            await ch.queue_declare(
                name, durable=declared_durable(spec, arguments), arguments=arguments
            )
        what, mismatch = f"queue {queue!r}", None
        await ch.queue_declare(queue, durable=spec.durable, arguments=queue_arguments(spec))
        for binding in spec.bindings:
            what = f"exchange {binding.exchange!r}"
            await ch.exchange_declare(
                binding.exchange,
                binding.exchange_type,
                passive=binding.exchange.startswith("amq."),
                durable=binding.durable,
                arguments=binding.arguments,
            )
            what = f"the binding of queue {queue!r} to exchange {binding.exchange!r}"
            await ch.queue_bind(queue, binding.exchange, binding.routing_key)
    except ChannelClosed as exc:
        raise TopologyError(what, exc, mismatch=mismatch) from exc
