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

import attrs

from ._publisher import COPIES, TRANSIENT
from ._request import DIRECT_REPLY_TO
from ._typed import is_msgpack
from .amqp import MessageReturned, Properties

if TYPE_CHECKING:
    from ._message import Message
    from ._publisher import PublishChannelSlot

__all__ = [
    "Replier",
    "Reply",
    "encode_reply",
    "publishing_replier",
]

logger = logging.getLogger("strictconsume")


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
