"""A request and its reply over RabbitMQ's direct reply-to: :meth:`Publisher.request`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from ._message import Message

if TYPE_CHECKING:
    from .amqp import Connection, Properties

__all__ = ["DIRECT_REPLY_TO", "request"]

logger = logging.getLogger("strictconsume")

#: RabbitMQ's direct reply-to pseudo-queue.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


async def request(
    connection: Connection,
    body: bytes,
    *,
    routing_key: str,
    exchange: str,
    properties: Properties,
    timeout: float,  # noqa: ASYNC109 (the reply's, part of the call)
) -> Message:
    """Publish a request carrying ``reply_to`` RabbitMQ's direct reply-to, and return
    the reply with its ``correlation_id`` (see :meth:`Publisher.request`).

    Each request has a channel of its own on ``connection``: direct reply-to wants the
    reply consumer (no-ack, subscribed before the publish) on the channel that
    publishes, and a channel of its own keeps requests apart without a dispatcher of
    replies. The channel closes when the reply came or the timeout passed; a reply
    arriving after that is dropped by the broker.

    Raises:
        TimeoutError: no reply within ``timeout`` seconds.
        MessageReturned: no queue took the request.
    """
    correlation_id = properties.correlation_id
    assert correlation_id
    properties.reply_to = DIRECT_REPLY_TO
    with anyio.move_on_after(timeout) as scope:
        async with (
            connection.channel(confirms=True) as ch,
            ch.consume(DIRECT_REPLY_TO, no_ack=True) as replies,
        ):
            await ch.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
            )
            async for delivery in replies:
                if delivery.properties.correlation_id == correlation_id:
                    return Message.from_delivery(delivery, DIRECT_REPLY_TO)
                logger.debug(
                    "a reply for correlation_id %r, not ours (%r), dropped",
                    delivery.properties.correlation_id,
                    correlation_id,
                )
    if not scope.cancelled_caught:
        raise RuntimeError(f"the reply consumer of request {correlation_id!r} ended")
    raise TimeoutError(
        f"no reply to the request {correlation_id!r} sent to {routing_key!r} "
        f"(exchange {exchange!r}) within {timeout:g} s"
    )
