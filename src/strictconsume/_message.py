"""What a handler receives: :class:`Message`."""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from .amqp import Delivery, Properties, Timestamp

__all__ = [
    "ACQUIRED_COUNT_HEADER",
    "ATTEMPT_HEADER",
    "BROKER_COUNT_HEADERS",
    "DELIVERY_COUNT_HEADER",
    "ORIGINAL_EXCHANGE_HEADER",
    "ORIGINAL_ROUTING_KEY_HEADER",
    "DecodeError",
    "Message",
    "attempt_of",
]

#: The attempt number a retried copy carries (1 on the first delivery, absent there).
ATTEMPT_HEADER = "x-attempt"
#: Set by quorum queues on a redelivery: how often the message was returned to the
#: queue before this delivery (before RabbitMQ 4.3 every return; from 4.3 failed
#: deliveries only: a lost channel or connection, a basic.reject; see _versions).
DELIVERY_COUNT_HEADER = "x-delivery-count"
#: Set by quorum queues from RabbitMQ 4.3 on a redelivery: every return to the queue
#: (where ``x-delivery-count`` counts the failed ones only).
ACQUIRED_COUNT_HEADER = "x-acquired-count"
#: The broker's counts of one message's deliveries: a copy is a new message, so
#: retry and dead-letter copies drop them (``x-attempt`` holds what counts).
BROKER_COUNT_HEADERS = (DELIVERY_COUNT_HEADER, ACQUIRED_COUNT_HEADER)
#: Where a message was first published; a retried copy travels through the retry
#: queue with a different exchange and routing key, so the original ones ride along.
ORIGINAL_EXCHANGE_HEADER = "x-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-original-routing-key"


class DecodeError(ValueError):
    """The message body is not what the handler asked for (invalid UTF-8, not JSON).

    Raised by :meth:`Message.text` and :meth:`Message.json`. When it escapes the
    handler, the message is dead-lettered at once: bad input is not retried.
    """


def _count(value: object, minimum: int) -> int | None:
    """A counter header's value, or None when absent or garbled (never raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    if isinstance(value, bytes | bytearray | str):
        text = value.decode("ascii", "replace") if not isinstance(value, str) else value
        # isdigit() accepts "²", which int() refuses: this must never raise.
        if text.isascii() and text.isdecimal() and int(text) >= minimum:
            return int(text)
    return None


def attempt_of(headers: FieldTable | None, *, delivery_count: bool = False) -> int:
    """The attempt number recorded in a message's headers (1 when absent or garbled).

    With ``delivery_count`` (a quorum queue), the broker's ``x-delivery-count`` (the
    returns to the queue before this delivery) is added.
    """
    if not headers:
        return 1
    attempt = _count(headers.get(ATTEMPT_HEADER), 1) or 1
    if delivery_count:
        attempt += _count(headers.get(DELIVERY_COUNT_HEADER), 0) or 0
    return attempt


def _text(value: object, default: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    return default


@attrs.frozen(repr=False)
class Message:
    """One delivery, as a handler sees it.

    ``routing_key`` and ``exchange`` are those the message was first published with,
    also on a retried copy (which reaches the queue again through its retry queue).
    ``attempt`` is 1 on the first delivery and counts retries. On a classic queue a
    requeue (``Requeue``, a shutdown, a lost connection) does not count as an attempt;
    on a quorum queue what the broker counts in ``x-delivery-count`` does: a lost
    connection always, a ``Requeue`` before RabbitMQ 4.3 only.
    """

    body: bytes
    properties: Properties
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    queue: str
    attempt: int
    consumer_tag: str = ""

    @classmethod
    def from_delivery(
        cls, delivery: Delivery, queue: str, *, delivery_count: bool = False
    ) -> Message:
        """The message of ``delivery`` from ``queue``; ``delivery_count``: the queue is
        a quorum queue, whose ``x-delivery-count`` header counts as attempts.

        The header counts on a redelivery only: the broker sets it there, while on a
        first delivery it would be one a publisher copied from another message.
        """
        headers = delivery.properties.headers
        exchange, routing_key = delivery.exchange, delivery.routing_key
        if headers and ORIGINAL_ROUTING_KEY_HEADER in headers:
            exchange = _text(headers.get(ORIGINAL_EXCHANGE_HEADER), exchange)
            routing_key = _text(headers.get(ORIGINAL_ROUTING_KEY_HEADER), routing_key)
        return cls(
            body=delivery.body,
            properties=delivery.properties,
            delivery_tag=delivery.delivery_tag,
            redelivered=delivery.redelivered,
            exchange=exchange,
            routing_key=routing_key,
            queue=queue,
            attempt=attempt_of(headers, delivery_count=delivery_count and delivery.redelivered),
            consumer_tag=delivery.consumer_tag,
        )

    def __repr__(self) -> str:
        return (
            f"<Message queue={self.queue!r} delivery_tag={self.delivery_tag} "
            f"message_id={self.message_id!r} attempt={self.attempt} "
            f"body={len(self.body)} bytes>"
        )

    @property
    def headers(self) -> FieldTable:
        """The message's headers (an empty dict when it has none)."""
        return self.properties.headers or {}

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self.properties.correlation_id

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def reply_to(self) -> str | None:
        return self.properties.reply_to

    @property
    def timestamp(self) -> datetime.datetime | Timestamp | None:
        """The ``timestamp`` property: a UTC datetime, or a :class:`Timestamp` (its
        seconds) when it is beyond what a datetime holds (before year 1, after 9999)."""
        return self.properties.timestamp

    def text(self, encoding: str = "utf-8") -> str:
        """The body as text.

        Raises:
            DecodeError: the body is not valid in ``encoding``; the message is then
                dead-lettered without retries.
        """
        try:
            return self.body.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DecodeError(
                f"the body of message {self.message_id!r} from queue {self.queue!r} is not "
                f"valid {encoding} (byte {exc.start}: {exc.reason})"
            ) from exc

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            DecodeError: the body is not UTF-8 JSON; the message is then dead-lettered
                without retries (retrying cannot fix bad input).
        """
        text = self.text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DecodeError(
                f"the body of message {self.message_id!r} from queue {self.queue!r} is not "
                f"JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from exc
