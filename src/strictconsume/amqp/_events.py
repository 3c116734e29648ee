"""What the sans-IO core reports: one attrs class per event, and the credentials it
is given.

Every event is a frozen value; the I/O layer matches on its type. The core builds
them (``_receive.py``, ``_handshake.py``, ``_content.py``); nothing here knows about
frames or state.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs
from pamqp import commands
from pamqp.base import Frame

__all__ = [
    "ChannelCloseCompleted",
    "ChannelClosedByBroker",
    "ChannelFlow",
    "ChannelOpened",
    "ConnectionBlocked",
    "ConnectionCloseCompleted",
    "ConnectionClosedByBroker",
    "ConnectionOpened",
    "ConnectionUnblocked",
    "ConsumerCancelledByBroker",
    "Credentials",
    "Delivery",
    "Event",
    "GetResult",
    "HeartbeatReceived",
    "MethodReceived",
    "PublishConfirmed",
    "Returned",
    "server_version",
    "text",
]


@attrs.frozen
class Credentials:
    """A user name and password for the PLAIN mechanism; the password is never shown."""

    username: str
    password: str = attrs.field(repr=False)


def server_version(server_properties: dict[str, object]) -> tuple[int, int, int] | None:
    """The ``version`` of connection.start's server properties as numbers.

    RabbitMQ sends ``"4.3.6"`` (a long string, bytes or str after decoding); a
    pre-release suffix (``"4.1.0-rc.1"``, ``"3.13.7+2"``) is ignored. None when the
    property is missing or does not start with a number.
    """
    value = server_properties.get("version")
    if isinstance(value, bytes | bytearray):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    numbers: list[int] = []
    for part in value.split(".")[:3]:
        digits = ""
        for char in part:
            if not char.isascii() or not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) != len(part):
            break
    if not numbers:
        return None
    major, minor, patch = (*numbers, 0, 0)[:3]
    return (major, minor, patch)


# Events ---------------------------------------------------------------------------


@attrs.frozen(slots=True)
class ConnectionOpened:
    """The handshake completed (connection.open-ok) with these negotiated values."""

    server_properties: dict[str, object]
    channel_max: int
    frame_max: int
    heartbeat: int


@attrs.frozen(slots=True)
class ConnectionClosedByBroker:
    """The broker closed the connection; the core already queued connection.close-ok."""

    reply_code: int
    reply_text: str
    class_id: int
    method_id: int


@attrs.frozen(slots=True)
class ConnectionCloseCompleted:
    """The broker confirmed our connection.close (close-ok)."""


@attrs.frozen(slots=True)
class ConnectionBlocked:
    """The broker stopped reading from this connection (a resource alarm)."""

    reason: str


@attrs.frozen(slots=True)
class ConnectionUnblocked:
    """The broker reads from this connection again."""


@attrs.frozen(slots=True)
class HeartbeatReceived:
    """The broker sent a heartbeat frame."""


@attrs.frozen(slots=True)
class ChannelOpened:
    """The broker confirmed channel.open (open-ok)."""

    channel_id: int


@attrs.frozen(slots=True)
class ChannelClosedByBroker:
    """The broker closed a channel; the core queued close-ok and freed the id."""

    channel_id: int
    reply_code: int
    reply_text: str
    class_id: int
    method_id: int


@attrs.frozen(slots=True)
class ChannelCloseCompleted:
    """Our close_channel() completed; the id is free again."""

    channel_id: int


@attrs.frozen(slots=True)
class ChannelFlow:
    """The broker asked us to stop (active=False) or resume sending content on a
    channel; the core queued channel.flow-ok."""

    channel_id: int
    active: bool


@attrs.frozen(slots=True)
class MethodReceived:
    """A reply to a synchronous request (Queue.DeclareOk, Basic.ConsumeOk, ...)."""

    channel_id: int
    method: Frame


@attrs.frozen(slots=True)
class Delivery:
    """A message delivered to a consumer (basic.deliver with its content).

    ``properties_error`` says why the properties could not be decoded (they are then
    empty); the consumer should reject such a delivery to its dead-letter queue.
    """

    channel_id: int
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: commands.Basic.Properties
    body: bytes
    properties_error: str | None = None


@attrs.frozen(slots=True)
class GetResult:
    """A message fetched with basic.get (basic.get-ok with its content)."""

    channel_id: int
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    message_count: int
    properties: commands.Basic.Properties
    body: bytes


@attrs.frozen(slots=True)
class Returned:
    """A mandatory message the broker could not route (basic.return with its content).

    ``publish_tag`` is the publish sequence number it was matched to in confirm mode
    (see the module notes), else None.
    """

    channel_id: int
    publish_tag: int | None
    reply_code: int
    reply_text: str
    exchange: str
    routing_key: str
    properties: commands.Basic.Properties
    body: bytes


@attrs.frozen(slots=True)
class PublishConfirmed:
    """The broker acked (ack=True) or nacked these publish sequence numbers, ascending."""

    channel_id: int
    publish_tags: tuple[int, ...]
    ack: bool


@attrs.frozen(slots=True)
class ConsumerCancelledByBroker:
    """The broker cancelled a consumer (basic.cancel); cancel-ok is queued unless nowait."""

    channel_id: int
    consumer_tag: str


Event: TypeAlias = (
    ConnectionOpened
    | ConnectionClosedByBroker
    | ConnectionCloseCompleted
    | ConnectionBlocked
    | ConnectionUnblocked
    | HeartbeatReceived
    | ChannelOpened
    | ChannelClosedByBroker
    | ChannelCloseCompleted
    | ChannelFlow
    | MethodReceived
    | Delivery
    | GetResult
    | Returned
    | PublishConfirmed
    | ConsumerCancelledByBroker
)


def text(value: object) -> str:
    """A decoded AMQP string as str (pamqp returns bytes for a long string that is not
    UTF-8)."""
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1")
    return "" if value is None else str(value)
