"""The sans-IO AMQP 0-9-1 state machine: bytes in, events out; calls in, bytes out.

:class:`ProtocolConnection` never touches a socket or a clock. The I/O layer feeds it
what it read (:meth:`ProtocolConnection.receive_data`), acts on the events it gets
back, and writes whatever :meth:`ProtocolConnection.data_to_send` returns.

This module is the facade: it owns the receive buffer and the connection's record
(``_state.ConnectionRecord``), checks every call and queues its frames; what the
broker sends is handled by the modules of their concern.

- ``_receive.py``: the frame loop, frame placement, the methods sent on a channel.
- ``_handshake.py``: connection-class methods (handshake, blocked, close), the
  client properties.
- ``_events.py``: the events it returns, and the credentials it is given.
- ``_framing.py``: frame constants, the first-bytes check, the decoders.
- ``_state.py``: connection and channel states, the handshake as a table, expected
  replies, tune negotiation.
- ``_content.py``: method, content header and body frames assembled into a message.
- ``_confirms.py``: publish sequence numbers, confirms, returns matched to publishes.
"""

# Protocol notes: see ``_receive.py`` for the rules of reading (frame limits, frame
# placement, replies in request order, what is dropped while closing).
#
# What the core does not do: it keeps no consumer tags (the I/O layer does) and no
# time (the I/O layer sends heartbeats and detects a silent peer).

from __future__ import annotations

import struct

import pamqp.frame
from pamqp import commands
from pamqp.base import Frame
from pamqp.heartbeat import Heartbeat

from ._codec import content_header
from ._errors import AMQPError, LocalProtocolError
from ._events import (
    ChannelCloseCompleted,
    ChannelClosedByBroker,
    ChannelFlow,
    ChannelOpened,
    ConnectionBlocked,
    ConnectionCloseCompleted,
    ConnectionClosedByBroker,
    ConnectionOpened,
    ConnectionUnblocked,
    ConsumerCancelledByBroker,
    Credentials,
    Delivery,
    Event,
    GetResult,
    HeartbeatReceived,
    MethodReceived,
    PublishConfirmed,
    Returned,
    server_version,
)
from ._framing import (
    CONNECTION_CLASS,
    FRAME_MIN_SIZE,
    FRAME_OVERHEAD,
    MAX_LONG,
    MAX_LONGLONG,
    MAX_SHORT,
    PROTOCOL_HEADER,
    body_frames,
    check_first_bytes,
)
from ._handshake import client_properties as client_properties_of
from ._receive import parse_frames
from ._state import (
    BROKER_ONLY_NAMES,
    DEDICATED_CALLS,
    ChannelRecord,
    ChannelState,
    ConnectionRecord,
    ConnectionState,
)

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


class ProtocolConnection:
    """One AMQP 0-9-1 connection as a state machine, without any I/O.

    Feed it the bytes read from the broker with :meth:`receive_data` and act on the
    events it returns; write what :meth:`data_to_send` returns after every call that
    may produce output. See the notes at the top of ``_receive.py`` for the
    protocol rules it enforces.

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
        if not 1 <= channel_max <= MAX_SHORT:
            raise ValueError(f"channel_max must be between 1 and 65535, not {channel_max!r}")
        if not FRAME_MIN_SIZE <= frame_max <= MAX_LONG:
            raise ValueError(f"frame_max must be between 4096 and 2**32 - 1, not {frame_max!r}")
        if heartbeat is not None and not 0 <= heartbeat <= MAX_SHORT:
            raise ValueError(
                f"heartbeat must be None or between 0 and 65535 seconds, not {heartbeat!r}"
            )
        properties = client_properties_of(client_properties)
        try:
            # Encode once with an empty response (never the password) to fail early.
            commands.Connection.StartOk(client_properties=properties, locale=locale).marshal()
            commands.Connection.Open(virtual_host=vhost).marshal()
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"client_properties, vhost or locale cannot be encoded in AMQP: {exc}"
            ) from exc

        self._conn = ConnectionRecord(
            credentials=credentials,
            vhost=vhost,
            auth_mechanism=auth_mechanism,
            wanted_heartbeat=heartbeat,
            locale=locale,
            client_properties=properties,
            channel_max=channel_max,
            frame_max=frame_max,
            heartbeat=heartbeat or 0,
        )
        self._buffer = bytearray()
        self._seen_first_frame = False
        self._error: AMQPError | None = None

    # Properties ---------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The connection's state."""
        return self._conn.state

    @property
    def server_properties(self) -> dict[str, object]:
        """The broker's properties from connection.start (empty before it)."""
        return self._conn.server_properties

    @property
    def server_version(self) -> tuple[int, int, int] | None:
        """The broker's version from connection.start (``(4, 3, 6)``), or None
        before it or when the broker does not say."""
        return server_version(self._conn.server_properties)

    @property
    def channel_max(self) -> int:
        """The negotiated highest channel id (ours before connection.tune)."""
        return self._conn.channel_max

    @property
    def frame_max(self) -> int:
        """The negotiated largest frame size (ours before connection.tune)."""
        return self._conn.frame_max

    @property
    def heartbeat(self) -> int:
        """The negotiated heartbeat interval in seconds, 0 when disabled (before
        connection.tune: ours, or 0 when we take the broker's)."""
        return self._conn.heartbeat

    # Output -------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Take everything queued for the wire.

        Returns:
            The bytes to write, in order; ``b""`` when nothing is queued.
        """
        conn = self._conn
        if not conn.outgoing:
            return b""
        data = b"".join(conn.outgoing)
        conn.outgoing = []
        conn.outgoing_size = 0
        return data

    def bytes_pending(self) -> int:
        """How many bytes :meth:`data_to_send` would return (for write backpressure)."""
        return self._conn.outgoing_size

    # Connection calls ---------------------------------------------------------------

    def initiate(self) -> None:
        """Start the handshake: queue the AMQP 0-9-1 protocol header.

        Raises:
            LocalProtocolError: The connection was already initiated.
        """
        conn = self._conn
        if conn.state is not ConnectionState.INITIAL:
            raise LocalProtocolError(
                f"initiate() can only be called once, on a new connection "
                f"(the connection is {conn.state.value})"
            )
        conn.state = ConnectionState.AWAIT_START
        conn.send(PROTOCOL_HEADER)

    def close(self, reply_code: int = 200, reply_text: str = "") -> None:
        """Start closing the connection: queue connection.close.

        Before the broker has tuned the connection there is nothing to say to it:
        the connection becomes CLOSED at once and the caller just drops the socket.
        A connection already CLOSING or CLOSED is left alone.

        Args:
            reply_code: The reply code sent to the broker (200 for a normal close).
            reply_text: A short explanation for the broker's log.
        """
        conn = self._conn
        state = conn.state
        if state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        if state in (
            ConnectionState.INITIAL,
            ConnectionState.AWAIT_START,
            ConnectionState.AWAIT_TUNE,
        ):
            conn.set_closed()
            return
        frame = pamqp.frame.marshal(commands.Connection.Close(reply_code, reply_text, 0, 0), 0)
        conn.state = ConnectionState.CLOSING
        for channel in conn.channels.values():
            channel.reset_content()
        conn.send(frame)

    def send_heartbeat(self) -> None:
        """Queue a heartbeat frame.

        Raises:
            LocalProtocolError: The connection is not tuned yet, or is closed.
        """
        if self._conn.state not in (
            ConnectionState.AWAIT_OPEN_OK,
            ConnectionState.OPEN,
            ConnectionState.CLOSING,
        ):
            raise LocalProtocolError(
                f"cannot send a heartbeat: the connection is {self._conn.state.value}"
            )
        self._conn.send(pamqp.frame.marshal(Heartbeat(), 0))

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
        conn = self._conn
        channels = conn.channels
        draining = conn.draining
        for channel_id in range(1, conn.channel_max + 1):
            if channel_id not in channels and channel_id not in draining:
                break
        else:
            raise LocalProtocolError(
                f"cannot open a channel: all {conn.channel_max} channels the broker "
                "allows are in use; close channels you no longer need"
            )
        channel = ChannelRecord(channel_id=channel_id, state=ChannelState.OPENING)
        channel.expected.append(("Channel.Open", ("Channel.OpenOk",)))
        channels[channel_id] = channel
        conn.send(pamqp.frame.marshal(commands.Channel.Open(), channel_id))
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
        channel = self._conn.channels.get(channel_id)
        if channel is None:
            raise LocalProtocolError(f"cannot close channel {channel_id}: it is not open")
        if channel.state is ChannelState.CLOSING:
            return
        frame = pamqp.frame.marshal(
            commands.Channel.Close(reply_code, reply_text, 0, 0), channel_id
        )
        channel.forget()
        channel.state = ChannelState.CLOSING
        self._conn.send(frame)

    def channel_state(self, channel_id: int) -> ChannelState | None:
        """The state of a channel, or None when the id is not in use."""
        channel = self._conn.channels.get(channel_id)
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
        if method.index >> 16 == CONNECTION_CLASS:
            raise LocalProtocolError(
                f"cannot send {name} with send_method(): the core drives connection-class "
                "methods itself (use initiate() and close())"
            )
        dedicated = DEDICATED_CALLS.get(name)
        if dedicated is not None:
            raise LocalProtocolError(f"cannot send {name} with send_method(): use {dedicated}")
        if name in BROKER_ONLY_NAMES:
            raise LocalProtocolError(
                f"cannot send {name}: only a broker sends it (the core answers the "
                "broker's own requests itself)"
            )
        channel = self._require_open_channel(channel_id, f"send {name}")
        frame = pamqp.frame.marshal(method, channel_id)
        self._check_frame_size(frame, name)
        if method.synchronous and not getattr(method, "nowait", False):
            channel.expected.append((name, tuple(method.valid_responses)))
        if isinstance(method, commands.Confirm.Select):
            channel.confirms.select()
        self._conn.send(frame)

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
        conn = self._conn
        outgoing = conn.outgoing
        outgoing.append(method_frame)
        outgoing.append(header_frame)
        size = len(body)
        conn.outgoing_size += len(method_frame) + len(header_frame) + size
        if size:
            frames = body_frames(body, channel_id, conn.frame_max)
            outgoing.extend(frames)
            conn.outgoing_size += FRAME_OVERHEAD * len(frames)
        return channel.confirms.published(exchange, routing_key, body, mandatory)

    def ack(self, channel_id: int, delivery_tag: int, *, multiple: bool = False) -> None:
        """Queue basic.ack for a delivery (and every earlier one with ``multiple``).

        Raises:
            LocalProtocolError: The connection or channel is not open, or the
                delivery tag is not a positive 64-bit number.
        """
        self._require_open_channel(channel_id, "ack")
        self._check_delivery_tag(delivery_tag, "ack")
        self._conn.send(pamqp.frame.marshal(commands.Basic.Ack(delivery_tag, multiple), channel_id))

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
        self._conn.send(
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
        self._conn.send(
            pamqp.frame.marshal(commands.Basic.Reject(delivery_tag, requeue), channel_id)
        )

    # Checks for calls ---------------------------------------------------------------

    def _require_open(self, what: str) -> None:
        state = self._conn.state
        if state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"cannot {what}: the connection is {state.value}, not open")

    def _require_open_channel(self, channel_id: int, what: str) -> ChannelRecord:
        conn = self._conn
        if conn.state is not ConnectionState.OPEN:  # on every publish and ack: no f-string
            self._require_open(f"{what} on channel {channel_id}")
        channel = conn.channels.get(channel_id)
        if channel is None:
            raise LocalProtocolError(f"cannot {what} on channel {channel_id}: it is not open")
        if channel.state is not ChannelState.OPEN:
            raise LocalProtocolError(
                f"cannot {what} on channel {channel_id}: it is {channel.state.value}, not open"
            )
        return channel

    def _check_frame_size(self, frame: bytes, what: str) -> None:
        if len(frame) > self._conn.frame_max:
            raise ValueError(
                f"{what} needs a frame of {len(frame)} bytes, more than the negotiated "
                f"frame_max of {self._conn.frame_max}; make its arguments or headers smaller"
            )

    @staticmethod
    def _check_delivery_tag(delivery_tag: int, what: str) -> None:
        if not 1 <= delivery_tag <= MAX_LONGLONG:
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
        conn = self._conn
        state = conn.state
        if state is ConnectionState.INITIAL:
            raise LocalProtocolError("receive_data() called before initiate()")
        if state is ConnectionState.CLOSED or not data:
            return []
        events: list[Event] = []
        conn.events = events
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
            conn.set_closed()
            raise
        if conn.state is ConnectionState.CLOSED:
            self._buffer = bytearray()
        elif source is buffer:
            del buffer[:consumed]
        elif consumed < len(data):
            buffer += memoryview(data)[consumed:]
        return events

    def _parse(self, source: bytes | bytearray) -> int:
        """Handle every complete frame in ``source``; return how many bytes were used."""
        if not self._seen_first_frame:
            if not check_first_bytes(source):
                return 0
            self._seen_first_frame = True
        return parse_frames(self._conn, source)

    # What the fuzz harness checks of the record (tests/fuzz/fuzz_frames.py) ----------

    @property
    def _channels(self) -> dict[int, ChannelRecord]:
        return self._conn.channels

    @property
    def _frame_limit(self) -> int:
        return self._conn.frame_limit
