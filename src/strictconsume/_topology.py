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
    "TopologyError",
    "dead_letter_arguments",
    "declare_consumer",
    "queue_arguments",
    "retry_arguments",
]


class TopologyError(Exception):
    """The broker refused a declaration: the queue or exchange exists with different
    settings (406), or the user may not declare it (403)."""

    def __init__(self, what: str, error: ChannelClosed) -> None:
        self.error = error
        self.reply_code = error.reply_code
        if error.reply_code == 406:
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


#: What a quorum consumer's retry and dead-letter queues add to their arguments. They
#: are quorum queues too: a classic queue lives on one node, and with that node down
#: the consumer could not declare it again on another, so it could not fail over. A
#: retry queue hands its messages back with at-least-once dead-lettering (RabbitMQ
#: 3.10+, which needs ``x-overflow=reject-publish``): the broker keeps a message until
#: the main queue has confirmed it, so an expiring retry is never dropped on the way.
QUORUM_DEAD_LETTER_ARGUMENTS: FieldTable = {"x-queue-type": "quorum"}
QUORUM_RETRY_ARGUMENTS: FieldTable = {
    "x-queue-type": "quorum",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def dead_letter_arguments(spec: ConsumerSpec) -> FieldTable | None:
    """The arguments of the consumer's dead-letter queue (None: a plain queue)."""
    return dict(QUORUM_DEAD_LETTER_ARGUMENTS) if spec.queue_type == "quorum" else None


def retry_arguments(spec: ConsumerSpec, delay: float) -> FieldTable:
    """The arguments of the consumer's retry queue for ``delay`` seconds (an ad-hoc
    one, outside the policy, expires when unused)."""
    arguments = dict(retry_queue_arguments(spec.queue, delay))
    if spec.retry.is_ad_hoc(delay):
        arguments.update(ad_hoc_queue_arguments(delay))
    if spec.queue_type == "quorum":
        arguments.update(QUORUM_RETRY_ARGUMENTS)
    return arguments


async def declare_consumer(ch: Channel, spec: ConsumerSpec) -> None:
    """Declare everything ``spec`` consumes from, in an order where each piece exists
    before something refers to it. On error the channel is closed by the broker.

    Raises:
        TopologyError: the broker refused a declaration (406 or 403 and others).
    """
    queue = spec.queue
    what = f"the dead-letter queue {dead_letter_queue_name(queue)!r}"
    try:
        dlq_arguments = dead_letter_arguments(spec)
        await ch.queue_declare(
            dead_letter_queue_name(queue), durable=spec.durable, arguments=dlq_arguments
        )
        for delay in sorted(set(spec.retry.delays)):
            name = retry_queue_name(queue, delay)
            what = f"the retry queue {name!r}"
            arguments = retry_arguments(spec, delay)
            await ch.queue_declare(name, durable=spec.durable, arguments=arguments)
        what = f"queue {queue!r}"
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
        raise TopologyError(what, exc) from exc
