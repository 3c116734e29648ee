"""The sans-IO AMQP 0-9-1 state machine: bytes in, events out; calls in, bytes out.

:class:`ProtocolConnection` never touches a socket or a clock. The I/O layer feeds it
what it read (:meth:`ProtocolConnection.receive_data`), acts on the events it gets
back, and writes whatever :meth:`ProtocolConnection.data_to_send` returns.
"""

# Protocol notes
# ==============
#
# Codec. pamqp encodes and decodes every frame: method frames, content headers,
# body frames, the protocol header and heartbeats (``pamqp.frame.marshal`` /
# ``pamqp.frame.unmarshal``). This module only reads the 7-byte frame header (type,
# channel, size) with ``struct`` to know where a frame ends before handing exactly
# that frame to pamqp, and checks the 0xCE frame-end octet first so that a garbled
# stream is reported as such.
#
# Reading. Received bytes are parsed in place with an offset; only the tail of an
# incomplete frame is kept (in a bytearray, trimmed from the front once per call). A
# frame whose declared size exceeds the frame limit is rejected as soon as its
# header is seen, before it is buffered. The limit is the negotiated frame_max after
# connection.tune and 131072 before it (connection.start may exceed the 4096 bytes
# every peer must accept). frame_max counts the whole frame: 7 header bytes, the
# payload and the frame-end octet.
#
# Handshake (AMQP 0-9-1 section 2.2.4), driven by the core:
#
#   client                         broker
#   protocol header  ----------->
#                    <-----------  connection.start    (version 0-9, mechanisms)
#   start-ok         ----------->                      (PLAIN "\0user\0password")
#                    <-----------  connection.tune     (0 means "no limit")
#   tune-ok, open    ----------->
#                    <-----------  connection.open-ok  -> ConnectionOpened
#
# The broker may answer with connection.close at any point of it (403
# ACCESS_REFUSED after start-ok, 530 NOT_ALLOWED after open); that becomes
# ConnectionClosedByBroker. A broker that does not speak 0-9-1 answers the protocol
# header with its own protocol header ("AMQP" and a version) and closes: that, and
# bytes that are not AMQP at all (an HTTP server on the port), are reported as
# RemoteProtocolError naming what was received.
#
# Negotiation on connection.tune: channel_max and frame_max are the smaller of the
# two non-zero values (a zero from the broker means no limit, so ours is used);
# channel_max is capped at 65535. Heartbeat: ours None takes the broker's value;
# ours 0 disables heartbeats; ours n takes min(n, broker) or n when the broker
# proposes 0.
#
# Frame placement: connection-class methods and heartbeats only on channel 0,
# everything else never on channel 0, and only on a channel that is open (or
# opening, where only channel.open-ok and channel.close may arrive).
#
# Content: basic.deliver, basic.get-ok and basic.return are each followed on their
# channel by one content header (class 60) and body frames until body_size bytes
# have arrived (none when body_size is 0). Any other frame on that channel in the
# meantime is a protocol error; frames of other channels may interleave.
#
# Synchronous requests: every synchronous method the client sends (pamqp's
# ``synchronous``, unless sent with nowait=True) queues its ``valid_responses`` on
# its channel; replies must arrive in that order. channel.close from the broker is
# always allowed and discards the channel's state.
#
# Closing: while we close a channel (close_channel), every frame for it is dropped
# except channel.close (answered with close-ok; the close is complete) and
# channel.close-ok. While we close the connection, everything is dropped except
# connection.close (answered with close-ok) and connection.close-ok. A channel's id
# is free again once its close completed. After the connection is CLOSED, received
# bytes are ignored.
#
# Publisher confirms: sending confirm.select puts the channel in confirm mode at once
# (publishes pipelined behind it are counted); publish sequence numbers start at 1.
# The outstanding sequence numbers are kept in publish order; basic.ack/basic.nack
# with multiple=True settle every outstanding number <= delivery_tag (all of them
# when delivery_tag is 0), with multiple=False exactly delivery_tag. Settling
# nothing, or a number that is not outstanding, is a protocol error.
#
# Returns in confirm mode: RabbitMQ sends basic.return for an unroutable mandatory
# message before the basic.ack for it, and in publish order. So a returned message
# is matched to the earliest outstanding, not yet returned, mandatory publish on its
# channel with the same exchange, routing key and body; Returned.publish_tag is its
# sequence number (None outside confirm mode or without a match). To do that the
# core keeps a reference (no copy) to the exchange, routing key and body of every
# mandatory publish until it is confirmed.
#
# What the core does not do: it keeps no consumer tags (the I/O layer does) and no
# time (the I/O layer sends heartbeats and detects a silent peer).

from __future__ import annotations

import collections
import enum
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias, cast

import attrs
import pamqp.frame
from pamqp import commands, constants, header
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.heartbeat import Heartbeat

from ._codec import content_header, decode_content_header
from ._errors import AMQPError, LocalProtocolError, RemoteProtocolError, UnsupportedSetting

if TYPE_CHECKING:
    from pamqp.common import FieldTable

__all__ = [
    "ChannelCloseCompleted",
    "ChannelClosedByBroker",
    "ChannelFlow",
    "ChannelOpened",
    "ChannelState",
    "ConnectionBlocked",
    "ConnectionCloseCompleted",
    "ConnectionClosedByBroker",
    "ConnectionOpened",
    "ConnectionState",
    "ConnectionUnblocked",
    "ConsumerCancelledByBroker",
    "Credentials",
    "Delivery",
    "Event",
    "GetResult",
    "HeartbeatReceived",
    "MethodReceived",
    "ProtocolConnection",
    "PublishConfirmed",
    "Returned",
    "server_version",
]

_FRAME_HEADER: Final = struct.Struct(">BHI")
_METHOD_INDEX: Final = struct.Struct(">I")
_CONTENT_PREFIX: Final = struct.Struct(">H2xQ")  # class id, (weight), body size
_FRAME_METHOD: Final = constants.FRAME_METHOD
_FRAME_HEADER_TYPE: Final = constants.FRAME_HEADER
_FRAME_BODY: Final = constants.FRAME_BODY
_FRAME_HEARTBEAT: Final = constants.FRAME_HEARTBEAT
_FRAME_TYPES: Final = frozenset({_FRAME_METHOD, _FRAME_HEADER_TYPE, _FRAME_BODY, _FRAME_HEARTBEAT})
_FRAME_END: Final = constants.FRAME_END
_FRAME_OVERHEAD: Final = 8  # 7 header bytes and the frame-end octet
_FRAME_MIN_SIZE: Final = constants.FRAME_MIN_SIZE
_PRE_TUNE_FRAME_LIMIT: Final = 131072
_CONNECTION_CLASS: Final = commands.Connection.frame_id
_BASIC_CLASS: Final = commands.Basic.frame_id
#: RabbitMQ 4.1 refuses a frame_max below 8192 in connection.tune-ok (it closes the
#: socket without a reason); the AMQP minimum of 4096 holds for older brokers.
_RABBITMQ_FRAME_MIN: Final = ((4, 1), 8192)
_MAX_SHORT: Final = 65535
_MAX_LONG: Final = 2**32 - 1
_MAX_LONGLONG: Final = 2**64 - 1
_PROTOCOL_HEADER: Final = header.ProtocolHeader().marshal()

# Names of every method that answers a synchronous request.
_REPLY_NAMES: Final = frozenset(
    name
    for method in cast("dict[int, type[Frame]]", commands.INDEX_MAPPING).values()
    for name in method.valid_responses
)
# Methods only a broker sends; the client must not send them with send_method().
_BROKER_ONLY_NAMES: Final = _REPLY_NAMES | {"Basic.Deliver", "Basic.Return"}
# Methods with a dedicated call.
_DEDICATED_CALLS: Final = {
    "Channel.Open": "open_channel()",
    "Channel.Close": "close_channel()",
    "Basic.Publish": "publish()",
}
_CHANNEL_CLOSE_INDEX: Final = commands.Channel.Close.index
_CHANNEL_CLOSE_OK_INDEX: Final = commands.Channel.CloseOk.index
_CONNECTION_CLOSE_INDEX: Final = commands.Connection.Close.index
_CONNECTION_CLOSE_OK_INDEX: Final = commands.Connection.CloseOk.index

_DEFAULT_CAPABILITIES: Final[dict[str, object]] = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "exchange_exchange_bindings": True,
    "per_consumer_qos": True,
}


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    INITIAL = "initial"
    AWAIT_START = "await_start"
    AWAIT_TUNE = "await_tune"
    AWAIT_OPEN_OK = "await_open_ok"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ChannelState(enum.Enum):
    """Where a channel is in its life; a channel whose close completed is forgotten."""

    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"


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

_ContentMethod: TypeAlias = commands.Basic.Deliver | commands.Basic.GetOk | commands.Basic.Return


# Per-channel state ----------------------------------------------------------------


@attrs.define(slots=True, eq=False)
class _Channel:
    """Everything the core tracks for one channel id."""

    channel_id: int
    state: ChannelState
    # Synchronous requests awaiting a reply, oldest first: (request name, valid replies).
    expected: collections.deque[tuple[str, tuple[str, ...]]] = attrs.Factory(collections.deque)
    # Publisher confirms.
    confirm: bool = False
    next_publish_tag: int = 1
    unconfirmed: set[int] = attrs.Factory(set)
    # Ascending; may still hold tags already confirmed singly (dropped lazily).
    publish_order: collections.deque[int] = attrs.Factory(collections.deque)
    # Mandatory, unconfirmed, not yet returned publishes: tag -> (exchange, key, body).
    returnable: dict[int, tuple[str, str, bytes]] = attrs.Factory(dict)
    # Content being assembled: the method, then the header, then body chunks.
    content_method: _ContentMethod | None = None
    content_properties: commands.Basic.Properties | None = None
    content_size: int = 0
    content_received: int = 0
    content_chunks: list[bytes] = attrs.Factory(list)
    # Why the content header's properties could not be decoded (a delivery only).
    content_error: str | None = None

    def reset_content(self) -> None:
        """Forget any content being assembled."""
        self.content_method = None
        self.content_properties = None
        self.content_error = None
        self.content_size = 0
        self.content_received = 0
        self.content_chunks = []


def _text(value: object) -> str:
    """A decoded AMQP string as str (pamqp returns bytes for a long string that is not
    UTF-8)."""
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1")
    return "" if value is None else str(value)


class ProtocolConnection:
    """One AMQP 0-9-1 connection as a state machine, without any I/O.

    Feed it the bytes read from the broker with :meth:`receive_data` and act on the
    events it returns; write what :meth:`data_to_send` returns after every call that
    may produce output. See the notes at the top of this module for the protocol
    rules it enforces.

    Args:
        credentials: User name and password for PLAIN; may be None for EXTERNAL.
        vhost: The virtual host to open.
        auth_mechanism: ``"PLAIN"`` or ``"EXTERNAL"`` (a TLS client certificate).
        channel_max: The most channels we want; the broker may lower it.
        frame_max: The largest frame we want, header and frame-end included; the
            broker may lower it. At least 4096.
        heartbeat: Heartbeat interval in seconds: None accepts the broker's proposal,
            0 disables heartbeats, n asks for at most n.
        client_properties: Merged over the default client properties (product,
            version, platform, capabilities; a ``capabilities`` table is merged over
            the default capabilities).
        locale: The locale sent in connection.start-ok.

    Raises:
        ValueError: An argument is out of range or cannot be encoded.
    """

    def __init__(
        self,
        *,
        credentials: Credentials | None,
        vhost: str = "/",
        auth_mechanism: str = "PLAIN",
        channel_max: int = 2047,
        frame_max: int = 131072,
        heartbeat: int | None = None,
        client_properties: dict[str, object] | None = None,
        locale: str = "en_US",
    ) -> None:
        if auth_mechanism not in ("PLAIN", "EXTERNAL"):
            raise ValueError(
                f'auth_mechanism must be "PLAIN" or "EXTERNAL", not {auth_mechanism!r}'
            )
        if auth_mechanism == "PLAIN" and credentials is None:
            raise ValueError('auth_mechanism "PLAIN" needs credentials (user name and password)')
        if not 1 <= channel_max <= _MAX_SHORT:
            raise ValueError(f"channel_max must be between 1 and 65535, not {channel_max!r}")
        if not _FRAME_MIN_SIZE <= frame_max <= _MAX_LONG:
            raise ValueError(f"frame_max must be between 4096 and 2**32 - 1, not {frame_max!r}")
        if heartbeat is not None and not 0 <= heartbeat <= _MAX_SHORT:
            raise ValueError(
                f"heartbeat must be None or between 0 and 65535 seconds, not {heartbeat!r}"
            )
        self._credentials = credentials
        self._vhost = vhost
        self._auth_mechanism = auth_mechanism
        self._wanted_heartbeat = heartbeat
        self._locale = locale
        self._client_properties = self._merge_client_properties(client_properties)
        try:
            # Encode once with an empty response (never the password) to fail early.
            commands.Connection.StartOk(
                client_properties=self._client_properties, locale=locale
            ).marshal()
            commands.Connection.Open(virtual_host=vhost).marshal()
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"client_properties, vhost or locale cannot be encoded in AMQP: {exc}"
            ) from exc

        self._state = ConnectionState.INITIAL
        self._server_properties: dict[str, object] = {}
        self._channel_max = channel_max
        self._frame_max = frame_max
        self._heartbeat = heartbeat or 0
        self._frame_limit = _PRE_TUNE_FRAME_LIMIT
        self._channels: dict[int, _Channel] = {}
        # Ids whose close crossed the broker's: reserved until its close-ok arrives.
        self._draining: set[int] = set()
        self._outgoing: list[bytes | memoryview] = []
        self._outgoing_size = 0
        self._buffer = bytearray()
        self._seen_first_frame = False
        self._error: AMQPError | None = None
        self._events: list[Event] = []

    # Properties ---------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The connection's state."""
        return self._state

    @property
    def server_properties(self) -> dict[str, object]:
        """The broker's properties from connection.start (empty before it)."""
        return self._server_properties

    @property
    def server_version(self) -> tuple[int, int, int] | None:
        """The broker's version from connection.start (``(4, 3, 6)``), or None
        before it or when the broker does not say."""
        return server_version(self._server_properties)

    @property
    def channel_max(self) -> int:
        """The negotiated highest channel id (ours before connection.tune)."""
        return self._channel_max

    @property
    def frame_max(self) -> int:
        """The negotiated largest frame size (ours before connection.tune)."""
        return self._frame_max

    @property
    def heartbeat(self) -> int:
        """The negotiated heartbeat interval in seconds, 0 when disabled (before
        connection.tune: ours, or 0 when we take the broker's)."""
        return self._heartbeat

    # Output -------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Take everything queued for the wire.

        Returns:
            The bytes to write, in order; ``b""`` when nothing is queued.
        """
        if not self._outgoing:
            return b""
        data = b"".join(self._outgoing)
        self._outgoing = []
        self._outgoing_size = 0
        return data

    def bytes_pending(self) -> int:
        """How many bytes :meth:`data_to_send` would return (for write backpressure)."""
        return self._outgoing_size

    def _send(self, data: bytes) -> None:
        self._outgoing.append(data)
        self._outgoing_size += len(data)

    # Connection calls ---------------------------------------------------------------

    def initiate(self) -> None:
        """Start the handshake: queue the AMQP 0-9-1 protocol header.

        Raises:
            LocalProtocolError: The connection was already initiated.
        """
        if self._state is not ConnectionState.INITIAL:
            raise LocalProtocolError(
                f"initiate() can only be called once, on a new connection "
                f"(the connection is {self._state.value})"
            )
        self._state = ConnectionState.AWAIT_START
        self._send(_PROTOCOL_HEADER)

    def close(self, reply_code: int = 200, reply_text: str = "") -> None:
        """Start closing the connection: queue connection.close.

        Before the broker has tuned the connection there is nothing to say to it:
        the connection becomes CLOSED at once and the caller just drops the socket.
        A connection already CLOSING or CLOSED is left alone.

        Args:
            reply_code: The reply code sent to the broker (200 for a normal close).
            reply_text: A short explanation for the broker's log.
        """
        state = self._state
        if state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        if state in (
            ConnectionState.INITIAL,
            ConnectionState.AWAIT_START,
            ConnectionState.AWAIT_TUNE,
        ):
            self._set_closed()
            return
        frame = pamqp.frame.marshal(commands.Connection.Close(reply_code, reply_text, 0, 0), 0)
        self._state = ConnectionState.CLOSING
        for channel in self._channels.values():
            channel.reset_content()
        self._send(frame)

    def send_heartbeat(self) -> None:
        """Queue a heartbeat frame.

        Raises:
            LocalProtocolError: The connection is not tuned yet, or is closed.
        """
        if self._state not in (
            ConnectionState.AWAIT_OPEN_OK,
            ConnectionState.OPEN,
            ConnectionState.CLOSING,
        ):
            raise LocalProtocolError(
                f"cannot send a heartbeat: the connection is {self._state.value}"
            )
        self._send(pamqp.frame.marshal(Heartbeat(), 0))

    # Channel calls ------------------------------------------------------------------

    def open_channel(self) -> int:
        """Open a channel on the lowest free id: queue channel.open.

        Returns:
            The channel id; the channel is OPENING until :class:`ChannelOpened`.

        Raises:
            LocalProtocolError: The connection is not open, or every id in
                1..channel_max is in use.
        """
        self._require_open("open a channel")
        channels = self._channels
        draining = self._draining
        for channel_id in range(1, self._channel_max + 1):
            if channel_id not in channels and channel_id not in draining:
                break
        else:
            raise LocalProtocolError(
                f"cannot open a channel: all {self._channel_max} channels the broker "
                "allows are in use; close channels you no longer need"
            )
        channel = _Channel(channel_id, ChannelState.OPENING)
        channel.expected.append(("Channel.Open", ("Channel.OpenOk",)))
        channels[channel_id] = channel
        self._send(pamqp.frame.marshal(commands.Channel.Open(), channel_id))
        return channel_id

    def close_channel(self, channel_id: int, reply_code: int = 200, reply_text: str = "") -> None:
        """Start closing a channel: queue channel.close.

        Everything the broker still sends on the channel is dropped until it
        confirms (:class:`ChannelCloseCompleted`). Closing a channel that is already
        closing does nothing.

        Args:
            channel_id: The channel to close (OPENING or OPEN).
            reply_code: The reply code sent to the broker (200 for a normal close).
            reply_text: A short explanation for the broker's log.

        Raises:
            LocalProtocolError: The connection is not open, or the channel is unknown.
        """
        self._require_open(f"close channel {channel_id}")
        channel = self._channels.get(channel_id)
        if channel is None:
            raise LocalProtocolError(f"cannot close channel {channel_id}: it is not open")
        if channel.state is ChannelState.CLOSING:
            return
        frame = pamqp.frame.marshal(
            commands.Channel.Close(reply_code, reply_text, 0, 0), channel_id
        )
        self._forget_channel_state(channel)
        channel.state = ChannelState.CLOSING
        self._send(frame)

    def channel_state(self, channel_id: int) -> ChannelState | None:
        """The state of a channel, or None when the id is not in use."""
        channel = self._channels.get(channel_id)
        return None if channel is None else channel.state

    def send_method(self, channel_id: int, method: Frame) -> None:
        """Queue any client method on an open channel (qos, declare, consume, ...).

        A synchronous method (unless sent with ``nowait=True``) makes the core expect
        its reply next on this channel, see :class:`MethodReceived`. Sending
        Confirm.Select puts the channel in confirm mode at once.

        Args:
            channel_id: An OPEN channel.
            method: A pamqp method, for example ``commands.Basic.Qos(prefetch_count=10)``.

        Raises:
            LocalProtocolError: The connection or channel is not open, or the method
                has a dedicated call (connection class, channel.open/close, publish)
                or is one only a broker sends.
        """
        name = method.name
        if method.index >> 16 == _CONNECTION_CLASS:
            raise LocalProtocolError(
                f"cannot send {name} with send_method(): the core drives connection-class "
                "methods itself (use initiate() and close())"
            )
        dedicated = _DEDICATED_CALLS.get(name)
        if dedicated is not None:
            raise LocalProtocolError(f"cannot send {name} with send_method(): use {dedicated}")
        if name in _BROKER_ONLY_NAMES:
            raise LocalProtocolError(
                f"cannot send {name}: only a broker sends it (the core answers the "
                "broker's own requests itself)"
            )
        channel = self._require_open_channel(channel_id, f"send {name}")
        frame = pamqp.frame.marshal(method, channel_id)
        self._check_frame_size(frame, name)
        if method.synchronous and not getattr(method, "nowait", False):
            channel.expected.append((name, tuple(method.valid_responses)))
        if isinstance(method, commands.Confirm.Select) and not channel.confirm:
            channel.confirm = True
            channel.next_publish_tag = 1
        self._send(frame)

    def publish(
        self,
        channel_id: int,
        *,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: commands.Basic.Properties | None = None,
        mandatory: bool = False,
    ) -> int | None:
        """Queue a message: basic.publish, its content header and its body frames.

        The body is split into frames of at most frame_max - 8 bytes; an empty body
        has no body frame.

        Args:
            channel_id: An OPEN channel.
            exchange: The exchange ("" for the default exchange).
            routing_key: The routing key.
            body: The message body.
            properties: The message properties (none when None).
            mandatory: Ask the broker to return the message if no queue gets it.

        Returns:
            The publish sequence number (the delivery tag of the broker's confirm) on
            a channel in confirm mode, else None.

        Raises:
            LocalProtocolError: The connection or channel is not open.
            ValueError: The exchange, routing key or properties cannot be encoded.
        """
        channel = self._require_open_channel(channel_id, "publish")
        if type(body) is not bytes:
            body = bytes(body)
        try:
            method_frame = pamqp.frame.marshal(
                commands.Basic.Publish(
                    exchange=exchange, routing_key=routing_key, mandatory=mandatory
                ),
                channel_id,
            )
            header_frame = pamqp.frame.marshal(content_header(len(body), properties), channel_id)
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise ValueError(
                f"cannot publish to exchange {exchange!r} with routing key {routing_key!r}: {exc}"
            ) from exc
        self._check_frame_size(header_frame, "the content header (message properties)")
        outgoing = self._outgoing
        outgoing.append(method_frame)
        outgoing.append(header_frame)
        size = len(body)
        self._outgoing_size += len(method_frame) + len(header_frame) + size
        if size:
            chunk_max = self._frame_max - _FRAME_OVERHEAD
            marshal = pamqp.frame.marshal
            for start in range(0, size, chunk_max):
                chunk = body if size <= chunk_max else body[start : start + chunk_max]
                outgoing.append(marshal(ContentBody(chunk), channel_id))
                self._outgoing_size += _FRAME_OVERHEAD
        if not channel.confirm:
            return None
        tag = channel.next_publish_tag
        channel.next_publish_tag = tag + 1
        channel.unconfirmed.add(tag)
        channel.publish_order.append(tag)
        if mandatory:
            channel.returnable[tag] = (exchange, routing_key, body)
        return tag

    def ack(self, channel_id: int, delivery_tag: int, *, multiple: bool = False) -> None:
        """Queue basic.ack for a delivery (and every earlier one with ``multiple``).

        Raises:
            LocalProtocolError: The connection or channel is not open, or the
                delivery tag is not a positive 64-bit number.
        """
        self._require_open_channel(channel_id, "ack")
        self._check_delivery_tag(delivery_tag, "ack")
        self._send(pamqp.frame.marshal(commands.Basic.Ack(delivery_tag, multiple), channel_id))

    def nack(
        self,
        channel_id: int,
        delivery_tag: int,
        *,
        multiple: bool = False,
        requeue: bool = True,
    ) -> None:
        """Queue basic.nack for a delivery (and every earlier one with ``multiple``).

        Raises:
            LocalProtocolError: The connection or channel is not open, or the
                delivery tag is not a positive 64-bit number.
        """
        self._require_open_channel(channel_id, "nack")
        self._check_delivery_tag(delivery_tag, "nack")
        self._send(
            pamqp.frame.marshal(commands.Basic.Nack(delivery_tag, multiple, requeue), channel_id)
        )

    def reject(self, channel_id: int, delivery_tag: int, *, requeue: bool = True) -> None:
        """Queue basic.reject for one delivery.

        Raises:
            LocalProtocolError: The connection or channel is not open, or the
                delivery tag is not a positive 64-bit number.
        """
        self._require_open_channel(channel_id, "reject")
        self._check_delivery_tag(delivery_tag, "reject")
        self._send(pamqp.frame.marshal(commands.Basic.Reject(delivery_tag, requeue), channel_id))

    # Checks for calls ---------------------------------------------------------------

    def _require_open(self, what: str) -> None:
        if self._state is not ConnectionState.OPEN:
            raise LocalProtocolError(
                f"cannot {what}: the connection is {self._state.value}, not open"
            )

    def _require_open_channel(self, channel_id: int, what: str) -> _Channel:
        self._require_open(f"{what} on channel {channel_id}")
        channel = self._channels.get(channel_id)
        if channel is None:
            raise LocalProtocolError(f"cannot {what} on channel {channel_id}: it is not open")
        if channel.state is not ChannelState.OPEN:
            raise LocalProtocolError(
                f"cannot {what} on channel {channel_id}: it is {channel.state.value}, not open"
            )
        return channel

    def _check_frame_size(self, frame: bytes, what: str) -> None:
        if len(frame) > self._frame_max:
            raise ValueError(
                f"{what} needs a frame of {len(frame)} bytes, more than the negotiated "
                f"frame_max of {self._frame_max}; make its arguments or headers smaller"
            )

    @staticmethod
    def _check_delivery_tag(delivery_tag: int, what: str) -> None:
        if not 1 <= delivery_tag <= _MAX_LONGLONG:
            raise LocalProtocolError(
                f"cannot {what} delivery tag {delivery_tag!r}: delivery tags are "
                "positive 64-bit numbers given by the broker"
            )

    # Input --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the broker.

        Partial frames are kept until the rest arrives. An empty ``data`` returns no
        event (end of stream is for the I/O layer to handle). Once the connection is
        CLOSED, received bytes are ignored.

        Args:
            data: Bytes as read from the socket, split anywhere.

        Returns:
            Every event completed by these bytes, in order.

        Raises:
            RemoteProtocolError: The broker broke the protocol. The connection is
                unusable afterwards: it is CLOSED, every later call raises again, and
                events completed earlier in the same call are dropped with it.
            LocalProtocolError: Called before :meth:`initiate`, or the broker offers
                no authentication mechanism we were configured for.
        """
        if self._error is not None:
            error = self._error
            raise type(error)(f"the connection already failed: {error}") from error
        state = self._state
        if state is ConnectionState.INITIAL:
            raise LocalProtocolError("receive_data() called before initiate()")
        if state is ConnectionState.CLOSED or not data:
            return []
        events: list[Event] = []
        self._events = events
        buffer = self._buffer
        source: bytes | bytearray
        if buffer:
            buffer += data
            source = buffer
        else:
            source = data
        try:
            consumed = self._parse(source)
        except AMQPError as exc:
            self._error = exc
            self._buffer = bytearray()
            self._set_closed()
            raise
        if self._state is ConnectionState.CLOSED:
            self._buffer = bytearray()
        elif source is buffer:
            del buffer[:consumed]
        elif consumed < len(data):
            buffer += memoryview(data)[consumed:]
        return events

    def _parse(self, source: bytes | bytearray) -> int:
        """Handle every complete frame in ``source``; return how many bytes were used."""
        size_total = len(source)
        if not self._seen_first_frame and not self._check_first_bytes(source):
            return 0
        pos = 0
        unpack = _FRAME_HEADER.unpack_from
        closed = ConnectionState.CLOSED
        # Only close() enters CLOSING, never a received frame: decide once.
        closing = self._state is ConnectionState.CLOSING
        with memoryview(source) as view:
            while size_total - pos >= 7:
                frame_type, channel_id, size = unpack(source, pos)
                if frame_type not in _FRAME_TYPES:
                    raise RemoteProtocolError(
                        f"the broker sent a frame of unknown type {frame_type} "
                        f"(channel {channel_id})"
                    )
                if size + _FRAME_OVERHEAD > self._frame_limit:
                    raise RemoteProtocolError(
                        f"the broker sent a frame of {size + _FRAME_OVERHEAD} bytes on channel "
                        f"{channel_id}, more than the frame limit of {self._frame_limit}"
                    )
                end = pos + size + _FRAME_OVERHEAD
                if end > size_total:
                    break
                if source[end - 1] != _FRAME_END:
                    raise RemoteProtocolError(
                        f"the broker sent a frame (type {frame_type}, channel {channel_id}) "
                        f"that does not end with the frame-end octet 0xCE "
                        f"(got 0x{source[end - 1]:02X})"
                    )
                if closing:
                    self._frame_while_closing(frame_type, channel_id, size, view, pos, end)
                elif frame_type == _FRAME_BODY:
                    self._body_frame(channel_id, view[pos + 7 : end - 1].tobytes())
                elif frame_type == _FRAME_METHOD:
                    self._method_frame(channel_id, size, view, pos, end)
                elif frame_type == _FRAME_HEADER_TYPE:
                    self._header_frame(channel_id, view[pos + 7 : end - 1].tobytes())
                else:
                    self._heartbeat_frame(channel_id, size)
                pos = end
                if self._state is closed:
                    return size_total
        return pos

    def _check_first_bytes(self, source: bytes | bytearray) -> bool:
        """Check that the broker's first bytes start an AMQP 0-9-1 frame.

        Returns:
            True once the first frame header is known to be plausible; False when
            more bytes are needed to tell.
        """
        head = bytes(source[:8])
        prefix = min(len(head), 4)
        if head[:prefix] == constants.AMQP[:prefix]:
            if len(head) < 8:
                return False
            # The broker answered our protocol header with the version it speaks.
            try:
                _, _, value = pamqp.frame.unmarshal(head)
            except Exception as exc:
                raise RemoteProtocolError(
                    f"the broker rejected AMQP 0-9-1 with a malformed protocol header {head!r}"
                ) from exc
            assert isinstance(value, header.ProtocolHeader)
            raise RemoteProtocolError(
                f"the broker does not support AMQP 0-9-1: it offered protocol version "
                f"{value.major_version}-{value.minor_version}-{value.revision} "
                f"(header {head!r}); strictconsume needs a broker speaking AMQP 0-9-1 "
                "such as RabbitMQ"
            )
        if head[0] == _FRAME_METHOD and len(head) < 7:
            return False
        if head[0] != _FRAME_METHOD or head[1:3] != b"\x00\x00":
            raise RemoteProtocolError(
                f"the peer does not speak AMQP 0-9-1: it sent {bytes(source[:32])!r}; "
                "is the port an AMQP port?"
            )
        self._seen_first_frame = True
        return True

    @staticmethod
    def _decode(frame: bytes) -> object:
        """Decode one whole frame with pamqp; any failure is the broker's."""
        try:
            return pamqp.frame.unmarshal(frame)[2]
        except Exception as exc:
            raise RemoteProtocolError(
                f"the broker sent a frame that cannot be decoded: {exc}"
            ) from exc

    # The two decoders below are the hot path (every delivery is a method frame, a
    # content header and a body frame). They do what pamqp.frame.unmarshal does for
    # their frame type, with pamqp's own classes, minus its generic part: _parse has
    # checked the frame header and the frame-end octet already, and unmarshal would
    # first try the frame as a protocol header, then parse its header again.

    @staticmethod
    def _decode_method(payload: bytes) -> Frame:
        """Decode a method frame's payload: the method index, then its arguments."""
        try:
            method: Frame = commands.INDEX_MAPPING[_METHOD_INDEX.unpack_from(payload)[0]]()
            method.unmarshal(payload[4:])
        except Exception as exc:
            raise RemoteProtocolError(
                f"the broker sent a frame that cannot be decoded: {exc!r}"
            ) from exc
        return method

    @staticmethod
    def _decode_header(payload: bytes) -> tuple[int, int, commands.Basic.Properties]:
        """Decode a content header frame's payload: class, body size, properties (by
        ``_codec``, which reads timestamps and header tables as pamqp does not)."""
        try:
            return decode_content_header(payload)
        except Exception as exc:
            raise RemoteProtocolError(
                f"the broker sent a frame that cannot be decoded: {exc!r}"
            ) from exc

    def _frame_while_closing(
        self,
        frame_type: int,
        channel_id: int,
        size: int,
        view: memoryview,
        start: int,
        end: int,
    ) -> None:
        """We sent connection.close: only connection.close and close-ok matter now."""
        if frame_type != _FRAME_METHOD or channel_id != 0 or size < 4:
            return
        index = _METHOD_INDEX.unpack_from(view, start + 7)[0]
        if index not in (_CONNECTION_CLOSE_INDEX, _CONNECTION_CLOSE_OK_INDEX):
            return
        method = self._decode(view[start:end].tobytes())
        if isinstance(method, commands.Connection.Close):
            self._on_connection_close(method)
        else:
            self._set_closed()
            self._events.append(ConnectionCloseCompleted())

    def _heartbeat_frame(self, channel_id: int, size: int) -> None:
        if channel_id != 0 or size != 0:
            raise RemoteProtocolError(
                f"the broker sent a malformed heartbeat frame (channel {channel_id}, "
                f"{size} payload bytes; a heartbeat has channel 0 and no payload)"
            )
        self._events.append(HeartbeatReceived())

    def _method_frame(
        self, channel_id: int, size: int, view: memoryview, start: int, end: int
    ) -> None:
        if channel_id == 0:
            method = self._decode(view[start:end].tobytes())
            assert isinstance(method, Frame)
            if method.index >> 16 != _CONNECTION_CLASS:
                raise RemoteProtocolError(
                    f"the broker sent {method.name} on channel 0, which carries only "
                    "connection-class methods"
                )
            self._connection_method(method)
            return
        channel = self._channels.get(channel_id)
        if channel is None or channel.state is ChannelState.CLOSING:
            self._method_for_closed_channel(channel_id, size, view, start, end)
            return
        method = self._decode_method(view[start + 7 : end - 1].tobytes())
        if method.index >> 16 == _CONNECTION_CLASS:
            raise RemoteProtocolError(
                f"the broker sent {method.name} on channel {channel_id}; connection-class "
                "methods belong on channel 0"
            )
        if channel.content_method is not None:
            raise RemoteProtocolError(
                f"the broker sent {method.name} on channel {channel_id} in the middle of "
                f"the content of {channel.content_method.name}"
            )
        handler = _CHANNEL_METHOD_HANDLERS.get(type(method))
        if channel.state is ChannelState.OPENING and not isinstance(
            method, commands.Channel.OpenOk | commands.Channel.Close
        ):
            raise RemoteProtocolError(
                f"the broker sent {method.name} on channel {channel_id} before channel.open-ok"
            )
        if handler is not None:
            handler(self, channel, method)
        elif method.name in _REPLY_NAMES:
            self._expect_reply(channel, method)
            self._events.append(MethodReceived(channel_id, method))
        else:
            raise RemoteProtocolError(
                f"the broker sent {method.name} on channel {channel_id}, a method only a "
                "client sends"
            )

    def _method_for_closed_channel(
        self, channel_id: int, size: int, view: memoryview, start: int, end: int
    ) -> None:
        """A method for a channel we are closing (or whose close crossed the broker's):
        only channel.close and channel.close-ok matter."""
        closing = channel_id in self._channels
        if not closing and channel_id not in self._draining:
            raise RemoteProtocolError(
                f"the broker sent a method frame for channel {channel_id}, which is not open"
            )
        if size < 4:
            self._decode(view[start:end].tobytes())  # raises: too short for a method
        index = _METHOD_INDEX.unpack_from(view, start + 7)[0]
        if index == _CHANNEL_CLOSE_OK_INDEX:
            if closing:
                del self._channels[channel_id]
                self._events.append(ChannelCloseCompleted(channel_id))
            else:
                self._draining.discard(channel_id)
        elif index == _CHANNEL_CLOSE_INDEX and closing:
            # Both sides closed at once. The broker still answers our channel.close
            # with close-ok (RabbitMQ does): keep the id until it arrives.
            self._send(pamqp.frame.marshal(commands.Channel.CloseOk(), channel_id))
            del self._channels[channel_id]
            self._draining.add(channel_id)
            self._events.append(ChannelCloseCompleted(channel_id))

    def _header_frame(self, channel_id: int, payload: bytes) -> None:
        channel = self._content_channel(channel_id, "content header")
        if channel is None:
            return
        method = channel.content_method
        if method is None:
            raise RemoteProtocolError(
                f"the broker sent a content header on channel {channel_id} without a "
                "basic.deliver, basic.get-ok or basic.return before it"
            )
        if channel.content_properties is not None:
            raise RemoteProtocolError(
                f"the broker sent a second content header on channel {channel_id} for "
                f"{method.name} while its body was still expected"
            )
        try:
            class_id, body_size, properties = self._decode_header(payload)
        except RemoteProtocolError as exc:
            # The frame is whole (its end octet checked); only its properties are not
            # valid Python values (a header name or short string that is not UTF-8, an
            # unknown field type), as any client may publish. A delivery is then handed
            # on with empty properties and the reason, for the consumer to reject it
            # to its dead-letter queue, raw properties intact; the connection lives.
            if type(method) is not commands.Basic.Deliver or len(payload) < 12:
                raise
            class_id, body_size = _CONTENT_PREFIX.unpack_from(payload)
            if class_id != _BASIC_CLASS:
                raise
            channel.content_error = f"its properties cannot be decoded ({exc.__cause__ or exc})"
            properties = commands.Basic.Properties()
        if class_id != _BASIC_CLASS:
            raise RemoteProtocolError(
                f"the broker sent a content header of class {class_id} on channel "
                f"{channel_id}; only the basic class (60) has content"
            )
        channel.content_properties = properties
        channel.content_size = body_size
        if not body_size:
            self._content_complete(channel, b"")

    def _body_frame(self, channel_id: int, payload: bytes) -> None:
        """A body frame: its payload is the content's bytes as they are (no codec)."""
        channel = self._content_channel(channel_id, "body frame")
        if channel is None:
            return
        if channel.content_properties is None:
            raise RemoteProtocolError(
                f"the broker sent a body frame on channel {channel_id} without a content "
                "header before it"
            )
        received = channel.content_received + len(payload)
        if received > channel.content_size:
            raise RemoteProtocolError(
                f"the broker sent more body bytes on channel {channel_id} than the "
                f"{channel.content_size} its content header announced"
            )
        if received == channel.content_size:
            chunks = channel.content_chunks
            if chunks:
                chunks.append(payload)
                payload = b"".join(chunks)
            self._content_complete(channel, payload)
        else:
            channel.content_chunks.append(payload)
            channel.content_received = received

    def _content_channel(self, channel_id: int, what: str) -> _Channel | None:
        """The channel a content frame belongs to; None when it is to be dropped."""
        channel = self._channels.get(channel_id)
        if channel is None:
            if channel_id in self._draining:
                return None
            if channel_id == 0:
                raise RemoteProtocolError(
                    f"the broker sent a {what} on channel 0, which carries no content"
                )
            raise RemoteProtocolError(
                f"the broker sent a {what} for channel {channel_id}, which is not open"
            )
        if channel.state is ChannelState.CLOSING:
            return None
        return channel

    def _content_complete(self, channel: _Channel, body: bytes) -> None:
        method = channel.content_method
        properties = channel.content_properties
        error = channel.content_error
        assert method is not None
        assert properties is not None
        channel.content_method = None
        channel.content_properties = None
        channel.content_error = None
        channel.content_size = 0
        channel.content_received = 0
        if channel.content_chunks:
            channel.content_chunks = []
        channel_id = channel.channel_id
        if type(method) is commands.Basic.Deliver:
            self._events.append(
                Delivery(
                    channel_id,
                    method.consumer_tag or "",
                    method.delivery_tag or 0,
                    method.redelivered,
                    method.exchange,
                    method.routing_key or "",
                    properties,
                    body,
                    error,
                )
            )
        elif isinstance(method, commands.Basic.GetOk):
            self._events.append(
                GetResult(
                    channel_id,
                    method.delivery_tag or 0,
                    method.redelivered,
                    method.exchange,
                    method.routing_key or "",
                    method.message_count or 0,
                    properties,
                    body,
                )
            )
        else:
            assert isinstance(method, commands.Basic.Return)
            exchange = method.exchange
            routing_key = method.routing_key or ""
            self._events.append(
                Returned(
                    channel_id,
                    self._match_return(channel, exchange, routing_key, body),
                    method.reply_code or 0,
                    method.reply_text,
                    exchange,
                    routing_key,
                    properties,
                    body,
                )
            )

    @staticmethod
    def _match_return(
        channel: _Channel, exchange: str, routing_key: str, body: bytes
    ) -> int | None:
        """The earliest returnable publish that this returned message is (module notes)."""
        for tag, published in channel.returnable.items():
            if published[0] == exchange and published[1] == routing_key and published[2] == body:
                del channel.returnable[tag]
                return tag
        return None

    # Connection-class methods -------------------------------------------------------

    def _connection_method(self, method: Frame) -> None:
        state = self._state
        if isinstance(method, commands.Connection.Close):
            self._on_connection_close(method)
            return
        handler = _CONNECTION_METHOD_HANDLERS.get((state, type(method)))
        if handler is None:
            raise RemoteProtocolError(
                f"the broker sent {method.name} while the connection is {state.value}"
            )
        handler(self, method)

    def _on_start(self, method: Frame) -> None:
        start = cast(commands.Connection.Start, method)
        if (start.version_major, start.version_minor) != (0, 9):
            raise RemoteProtocolError(
                f"the broker proposed AMQP {start.version_major}-{start.version_minor} in "
                "connection.start; strictconsume speaks AMQP 0-9-1"
            )
        offered = _text(start.mechanisms).split()
        if self._auth_mechanism not in offered:
            raise LocalProtocolError(
                f"the broker does not offer the {self._auth_mechanism} authentication "
                f"mechanism; it offers {' '.join(offered) or 'none'}: configure one of these "
                "(EXTERNAL needs the rabbitmq_auth_mechanism_ssl plugin and a TLS client "
                "certificate)"
            )
        self._server_properties = dict[str, object](start.server_properties or {})
        version = self.server_version
        (since, least) = _RABBITMQ_FRAME_MIN
        if version is not None and version[:2] >= since and self._frame_max < least:
            raise UnsupportedSetting(
                f"frame_max {self._frame_max} is below {least}, the least RabbitMQ "
                f"{'.'.join(map(str, since))} and later accept (this broker is "
                f"{'.'.join(map(str, version))}): ask for frame_max={least} or more, or "
                "leave frame_max out"
            )
        if self._auth_mechanism == "PLAIN":
            assert self._credentials is not None
            response = f"\0{self._credentials.username}\0{self._credentials.password}"
        else:
            response = ""
        self._send(
            pamqp.frame.marshal(
                commands.Connection.StartOk(
                    client_properties=self._client_properties,
                    mechanism=self._auth_mechanism,
                    response=response,
                    locale=self._locale,
                ),
                0,
            )
        )
        self._state = ConnectionState.AWAIT_TUNE

    def _on_secure(self, method: Frame) -> None:
        raise RemoteProtocolError(
            f"the broker sent connection.secure (a SASL challenge), which the "
            f"{self._auth_mechanism} mechanism does not use"
        )

    def _on_tune(self, method: Frame) -> None:
        tune = cast(commands.Connection.Tune, method)
        broker_channel_max = tune.channel_max
        broker_frame_max = tune.frame_max
        broker_heartbeat = tune.heartbeat
        if broker_frame_max and broker_frame_max < _FRAME_MIN_SIZE:
            raise RemoteProtocolError(
                f"the broker proposed frame_max {broker_frame_max}, below the minimum of "
                f"{_FRAME_MIN_SIZE} every AMQP peer must accept"
            )
        channel_max = self._channel_max
        if broker_channel_max:
            channel_max = min(channel_max, broker_channel_max)
        frame_max = self._frame_max
        if broker_frame_max:
            frame_max = min(frame_max, broker_frame_max)
        wanted = self._wanted_heartbeat
        if wanted is None:
            heartbeat = broker_heartbeat
        elif wanted == 0 or broker_heartbeat == 0:
            heartbeat = wanted
        else:
            heartbeat = min(wanted, broker_heartbeat)
        self._channel_max = min(channel_max, _MAX_SHORT)
        self._frame_max = frame_max
        self._frame_limit = frame_max
        self._heartbeat = heartbeat
        self._send(
            pamqp.frame.marshal(
                commands.Connection.TuneOk(self._channel_max, frame_max, heartbeat), 0
            )
        )
        self._send(pamqp.frame.marshal(commands.Connection.Open(virtual_host=self._vhost), 0))
        self._state = ConnectionState.AWAIT_OPEN_OK

    def _on_open_ok(self, method: Frame) -> None:
        self._state = ConnectionState.OPEN
        self._events.append(
            ConnectionOpened(
                self._server_properties, self._channel_max, self._frame_max, self._heartbeat
            )
        )

    def _on_connection_close(self, close: commands.Connection.Close) -> None:
        self._send(pamqp.frame.marshal(commands.Connection.CloseOk(), 0))
        self._set_closed()
        self._events.append(
            ConnectionClosedByBroker(
                close.reply_code or 0,
                _text(close.reply_text),
                close.class_id or 0,
                close.method_id or 0,
            )
        )

    def _on_blocked(self, method: Frame) -> None:
        blocked = cast(commands.Connection.Blocked, method)
        self._events.append(ConnectionBlocked(_text(blocked.reason)))

    def _on_unblocked(self, method: Frame) -> None:
        self._events.append(ConnectionUnblocked())

    def _set_closed(self) -> None:
        self._state = ConnectionState.CLOSED
        self._channels.clear()
        self._draining.clear()

    # Channel methods ----------------------------------------------------------------

    @staticmethod
    def _expect_reply(channel: _Channel, method: Frame) -> None:
        """Check that ``method`` answers the oldest request waiting on ``channel``."""
        name = method.name
        expected = channel.expected
        if not expected:
            raise RemoteProtocolError(
                f"the broker sent {name} on channel {channel.channel_id}, but no request "
                "on that channel is waiting for a reply"
            )
        request, replies = expected[0]
        if name not in replies:
            raise RemoteProtocolError(
                f"the broker sent {name} on channel {channel.channel_id} in reply to "
                f"{request}, which expects {' or '.join(replies)}"
            )
        expected.popleft()

    def _on_open_ok_channel(self, channel: _Channel, method: Frame) -> None:
        self._expect_reply(channel, method)
        channel.state = ChannelState.OPEN
        self._events.append(ChannelOpened(channel.channel_id))

    def _on_channel_close(self, channel: _Channel, method: Frame) -> None:
        close = cast(commands.Channel.Close, method)
        channel_id = channel.channel_id
        self._send(pamqp.frame.marshal(commands.Channel.CloseOk(), channel_id))
        del self._channels[channel_id]
        self._events.append(
            ChannelClosedByBroker(
                channel_id,
                close.reply_code or 0,
                _text(close.reply_text),
                close.class_id or 0,
                close.method_id or 0,
            )
        )

    def _on_channel_flow(self, channel: _Channel, method: Frame) -> None:
        active = bool(cast(commands.Channel.Flow, method).active)
        self._send(pamqp.frame.marshal(commands.Channel.FlowOk(active), channel.channel_id))
        self._events.append(ChannelFlow(channel.channel_id, active))

    def _on_content_method(self, channel: _Channel, method: Frame) -> None:
        channel.content_method = cast(_ContentMethod, method)

    def _on_get_ok(self, channel: _Channel, method: Frame) -> None:
        self._expect_reply(channel, method)
        channel.content_method = cast(commands.Basic.GetOk, method)

    def _on_cancel(self, channel: _Channel, method: Frame) -> None:
        cancel = cast(commands.Basic.Cancel, method)
        consumer_tag = cancel.consumer_tag or ""
        if not cancel.nowait:
            self._send(
                pamqp.frame.marshal(commands.Basic.CancelOk(consumer_tag), channel.channel_id)
            )
        self._events.append(ConsumerCancelledByBroker(channel.channel_id, consumer_tag))

    def _on_confirm(self, channel: _Channel, method: Frame) -> None:
        confirm = cast("commands.Basic.Ack | commands.Basic.Nack", method)
        is_ack = isinstance(confirm, commands.Basic.Ack)
        name = confirm.name
        channel_id = channel.channel_id
        if not channel.confirm:
            raise RemoteProtocolError(
                f"the broker sent {name} on channel {channel_id}, which is not in confirm mode"
            )
        tag = confirm.delivery_tag or 0
        unconfirmed = channel.unconfirmed
        order = channel.publish_order
        tags: list[int] = []
        if confirm.multiple:
            while order and (tag == 0 or order[0] <= tag):
                settled = order.popleft()
                if settled in unconfirmed:
                    unconfirmed.remove(settled)
                    tags.append(settled)
            if not tags:
                raise RemoteProtocolError(
                    f"the broker sent {name} (multiple) for publish tag {tag} on channel "
                    f"{channel_id}, but no publish up to it is awaiting a confirm"
                )
        else:
            if tag not in unconfirmed:
                raise RemoteProtocolError(
                    f"the broker sent {name} for publish tag {tag} on channel {channel_id}, "
                    "which is not awaiting a confirm"
                )
            unconfirmed.remove(tag)
            tags.append(tag)
            while order and order[0] not in unconfirmed:
                order.popleft()
        returnable = channel.returnable
        if returnable:
            for settled in tags:
                returnable.pop(settled, None)
        self._events.append(PublishConfirmed(channel_id, tuple(tags), is_ack))

    @staticmethod
    def _forget_channel_state(channel: _Channel) -> None:
        """Drop what a closing channel no longer needs."""
        channel.reset_content()
        channel.expected.clear()
        channel.unconfirmed.clear()
        channel.publish_order.clear()
        channel.returnable.clear()

    # Helpers ------------------------------------------------------------------------

    @staticmethod
    def _merge_client_properties(extra: dict[str, object] | None) -> FieldTable:
        from .. import __version__

        properties: dict[str, object] = {
            "product": "strictconsume",
            "version": __version__,
            "platform": f"Python {sys.version_info.major}.{sys.version_info.minor}",
            "capabilities": dict(_DEFAULT_CAPABILITIES),
        }
        for key, value in (extra or {}).items():
            current = properties.get(key)
            if key == "capabilities" and isinstance(current, dict) and isinstance(value, dict):
                properties[key] = {**current, **value}
            else:
                properties[key] = value
        return cast("FieldTable", properties)


_ChannelHandler: TypeAlias = Callable[[ProtocolConnection, _Channel, Frame], None]
_ConnectionHandler: TypeAlias = Callable[[ProtocolConnection, Frame], None]

# What the broker may send on an open channel besides replies (which are checked
# against the requests waiting on the channel and become MethodReceived).
_CHANNEL_METHOD_HANDLERS: Final[dict[type[Frame], _ChannelHandler]] = {
    commands.Basic.Deliver: ProtocolConnection._on_content_method,
    commands.Basic.Return: ProtocolConnection._on_content_method,
    commands.Basic.GetOk: ProtocolConnection._on_get_ok,
    commands.Basic.Ack: ProtocolConnection._on_confirm,
    commands.Basic.Nack: ProtocolConnection._on_confirm,
    commands.Basic.Cancel: ProtocolConnection._on_cancel,
    commands.Channel.OpenOk: ProtocolConnection._on_open_ok_channel,
    commands.Channel.Close: ProtocolConnection._on_channel_close,
    commands.Channel.Flow: ProtocolConnection._on_channel_flow,
}

# The handshake and the connection's life as a table: (state, method) -> handler.
# connection.close is accepted in every state and handled before this table.
_CONNECTION_METHOD_HANDLERS: Final[
    dict[tuple[ConnectionState, type[Frame]], _ConnectionHandler]
] = {
    (ConnectionState.AWAIT_START, commands.Connection.Start): ProtocolConnection._on_start,
    (ConnectionState.AWAIT_TUNE, commands.Connection.Tune): ProtocolConnection._on_tune,
    (ConnectionState.AWAIT_TUNE, commands.Connection.Secure): ProtocolConnection._on_secure,
    (ConnectionState.AWAIT_OPEN_OK, commands.Connection.OpenOk): ProtocolConnection._on_open_ok,
    (ConnectionState.OPEN, commands.Connection.Blocked): ProtocolConnection._on_blocked,
    (ConnectionState.OPEN, commands.Connection.Unblocked): ProtocolConnection._on_unblocked,
}
