"""Replies: a handler's return value, sent back to a request's ``reply_to``.

When a message carries ``reply_to``, what its handler returns is published to that
queue (through the default exchange) with the request's ``correlation_id``, confirmed
by the broker, before the request is acked: a reply that could not be published
fails the handler run (the request is retried by its policy), so a request is never
acked without its reply. The return value is encoded as:

=====================================  ===================================================
the handler returns                    the reply's body (content type)
=====================================  ===================================================
``None``                               empty (none)
``bytes``                              as it is (``application/octet-stream``)
``str``                                UTF-8 (``text/plain; charset=utf-8``)
a pydantic model                       ``model_dump_json()`` (``application/json``)
anything else                          msgspec's JSON (Structs, dataclasses, attrs
                                       classes, datetimes, ...), else ``json.dumps``
=====================================  ===================================================

A request whose content type is msgpack gets its reply in msgpack (through msgspec).
A reply whose queue no longer exists (the requester is gone) is dropped with a
warning: no retry would bring the requester back. Replies to RabbitMQ's direct
reply-to (``amq.rabbitmq.reply-to.*``) are published without ``mandatory``, since
the broker reports every such publish as unroutable.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ._publisher import COPIES, TRANSIENT
from ._typed import is_msgpack
from .amqp import MessageReturned, Properties

if TYPE_CHECKING:
    from ._message import Message
    from ._publisher import PublishChannelSlot
    from .amqp import Connection

__all__ = [
    "DIRECT_REPLY_TO",
    "Replier",
    "Reply",
    "encode_reply",
    "publishing_replier",
    "request",
]

logger = logging.getLogger("strictconsume")

#: RabbitMQ's direct reply-to pseudo-queue.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


@attrs.frozen
class Reply:
    """A reply to a request: what is published to its ``reply_to``."""

    #: The request's ``reply_to``: the reply's routing key on the default exchange.
    routing_key: str
    body: bytes
    correlation_id: str | None
    content_type: str | None


Replier = Callable[[Reply], Awaitable[None]]


def _plain(value: Any) -> Any:
    """A pydantic model as JSON-compatible values; anything else as it is."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    return value


def encode_reply(value: Any, request: Message) -> tuple[bytes, str | None]:
    """The body and content type of the reply to ``request`` carrying ``value``.

    Raises:
        TypeError: ``value`` cannot be encoded (the handler run fails).
    """
    if value is None:
        return b"", None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode(), "text/plain; charset=utf-8"
    msgspec = sys.modules.get("msgspec")
    if msgspec is None:
        try:
            import msgspec
        except ImportError:
            msgspec = None
    try:
        if is_msgpack(request.content_type) and msgspec is not None:
            return msgspec.msgpack.encode(_plain(value)), "application/msgpack"
        pydantic = sys.modules.get("pydantic")
        if pydantic is not None and isinstance(value, pydantic.BaseModel):
            return value.model_dump_json().encode(), "application/json"
        if msgspec is not None:
            return msgspec.json.encode(value), "application/json"
        return json.dumps(value, separators=(",", ":")).encode(), "application/json"
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the handler of queue {request.queue!r} returned a {type(value).__name__}, "
            f"which cannot be encoded as the reply to {request.reply_to!r}: {exc}; return "
            "bytes, str, JSON values or a typed value (pydantic, msgspec, dataclass, attrs)"
        ) from exc


def make_reply(value: Any, request: Message) -> Reply:
    """The reply to ``request`` (which has a ``reply_to``) carrying ``value``."""
    assert request.reply_to
    body, content_type = encode_reply(value, request)
    return Reply(request.reply_to, body, request.correlation_id, content_type)


def publishing_replier(publishing: PublishChannelSlot) -> Replier:
    """Publishes replies through the App's confirmed publishing connection."""

    async def publish(reply: Reply) -> None:
        direct = reply.routing_key.startswith(DIRECT_REPLY_TO)
        properties = Properties(
            correlation_id=reply.correlation_id,
            content_type=reply.content_type,
            delivery_mode=TRANSIENT,
        )
        try:
            await publishing.publish(
                reply.body,
                purpose=COPIES,
                exchange="",
                routing_key=reply.routing_key,
                properties=properties,
                mandatory=not direct,
            )
        except MessageReturned as exc:
            logger.warning(
                "the reply to %r (correlation_id %r) was dropped: no queue of that name (%s); "
                "the requester is gone",
                reply.routing_key,
                reply.correlation_id,
                exc,
                extra={"event": "reply_dropped", "reply_to": reply.routing_key},
            )

    return publish


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
    from ._message import Message

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
