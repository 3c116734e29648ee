"""The headers and properties of a retry or dead-letter copy of a message (design
section 3): the framework's dispatcher publishes them, and ``strictconsume.testing``
shows them to a test without a broker."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from ._message import (
    ATTEMPT_HEADER,
    BROKER_COUNT_HEADERS,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    Message,
)
from .amqp import Headers, Properties

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from ._outcome import Outcome

__all__ = ["copy_headers", "copy_properties", "dead_letter_headers", "retry_headers"]


def _original_route(msg: Message) -> FieldTable:
    """Where ``msg`` was first published, for a copy (unless it carries that already)."""
    if ORIGINAL_ROUTING_KEY_HEADER in msg.headers:
        return {}
    return {ORIGINAL_EXCHANGE_HEADER: msg.exchange, ORIGINAL_ROUTING_KEY_HEADER: msg.routing_key}


def retry_headers(msg: Message) -> FieldTable:
    """The headers a retry copy of ``msg`` gets (over the original's)."""
    return {ATTEMPT_HEADER: msg.attempt + 1, **_original_route(msg)}


def dead_letter_headers(msg: Message, outcome: Outcome) -> FieldTable:
    """The headers a dead-letter copy of ``msg`` gets: the reason, where and when."""
    now = datetime.datetime.now(datetime.UTC)
    return {
        "x-error-type": outcome.error_type,
        "x-error-message": outcome.error_message,
        "x-failed-queue": msg.queue,
        ATTEMPT_HEADER: msg.attempt,
        "x-failed-at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        **_original_route(msg),
    }


def copy_headers(original: FieldTable | None, headers: FieldTable) -> FieldTable:
    """The headers of a retry or dead-letter copy: the original's, updated.

    The original's headers as received (``Headers``) stay ``Headers``, so that the
    copy carries each of their entries as it was encoded (design section 3)."""
    merged = original.copy() if isinstance(original, Headers) else dict(original or {})
    # The copy is a new message: the broker's counts of the original's deliveries are
    # in its x-attempt already, and would otherwise be counted again.
    for name in BROKER_COUNT_HEADERS:
        merged.pop(name, None)
    merged.update(headers)
    return merged


def copy_properties(properties: Properties, headers: FieldTable) -> Properties:
    """The properties of a retry or dead-letter copy: the original's plus ``headers``,
    persistent, and without ``expiration`` (as the broker's own dead-lettering does:
    a per-message TTL would silently drop the copy from the dead-letter queue, or cut
    a retry delay short). Every other property is the original's: re-encoded, each
    gives the same bytes (a timestamp too, whatever its size: see ``amqp._codec``)."""
    copy = Properties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=copy_headers(properties.headers, headers),
        delivery_mode=2,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        message_type=properties.message_type,
        user_id=properties.user_id,
        app_id=properties.app_id,
    )
    copy.cluster_id = properties.cluster_id  # pamqp's constructor refuses one
    return copy
