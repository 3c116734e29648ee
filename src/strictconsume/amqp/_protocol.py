"""The sans-IO AMQP 0-9-1 state machine: bytes in, events out; calls in, bytes out.

:class:`ProtocolConnection` never touches a socket or a clock. The I/O layer feeds it
what it read (:meth:`ProtocolConnection.receive_data`), acts on the events it gets
back, and writes whatever :meth:`ProtocolConnection.data_to_send` returns.

This module is the facade and the dispatcher: it owns the byte buffer, the output and
the channel ids, and hands each frame to the module of its concern.

- ``_events.py``: the events it returns, and the credentials it is given.
- ``_framing.py``: frame constants, the first-bytes check, the decoders.
- ``_state.py``: connection and channel states, the handshake as a table, expected
  replies, tune negotiation.
- ``_content.py``: method, content header and body frames assembled into a message.
- ``_confirms.py``: publish sequence numbers, confirms, returns matched to publishes.
"""

# Protocol notes
# ==============
#
# Reading. Received bytes are parsed in place with an offset; only the tail of an
# incomplete frame is kept (in a bytearray, trimmed from the front once per call). A
# frame whose declared size exceeds the frame limit is rejected as soon as its
# header is seen, before it is buffered. The limit is the negotiated frame_max after
# connection.tune and 131072 before it (connection.start may exceed the 4096 bytes
# every peer must accept). frame_max counts the whole frame: 7 header bytes, the
# payload and the frame-end octet. A garbled stream (no 0xCE frame-end octet) is
# reported as such.
#
# The broker may answer with connection.close at any point of the handshake (403
# ACCESS_REFUSED after start-ok, 530 NOT_ALLOWED after open); that becomes
# ConnectionClosedByBroker. A broker that does not speak 0-9-1 answers the protocol
# header with its own protocol header ("AMQP" and a version) and closes: that, and
# bytes that are not AMQP at all (an HTTP server on the port), are reported as
# RemoteProtocolError naming what was received.
#
# Frame placement: connection-class methods and heartbeats only on channel 0,
# everything else never on channel 0, and only on a channel that is open (or
# opening, where only channel.open-ok and channel.close may arrive).
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
# What the core does not do: it keeps no consumer tags (the I/O layer does) and no
# time (the I/O layer sends heartbeats and detects a silent peer).

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias, cast

import pamqp.frame
from pamqp import commands
from pamqp.base import Frame
from pamqp.heartbeat import Heartbeat

from ._codec import content_header
from ._content import ContentMethod
from ._errors import AMQPError, LocalProtocolError, RemoteProtocolError, UnsupportedSetting
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
    text,
)
from ._framing import (
    CONNECTION_CLASS,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEADER_TYPE,
    FRAME_METHOD,
    FRAME_MIN_SIZE,
    FRAME_OVERHEAD,
    FRAME_TYPES,
    MAX_LONG,
    MAX_LONGLONG,
    MAX_SHORT,
    METHOD_INDEX,
    PRE_TUNE_FRAME_LIMIT,
    PROTOCOL_HEADER,
    body_frames,
    check_first_bytes,
    decode,
    decode_method,
)
from ._state import (
    BROKER_ONLY_NAMES,
    CHANNEL_CLOSE_INDEX,
    CHANNEL_CLOSE_OK_INDEX,
    CHANNEL_METHODS,
    CONNECTION_CLOSE_INDEX,
    CONNECTION_CLOSE_OK_INDEX,
    CONNECTION_TRANSITIONS,
    DEDICATED_CALLS,
    REPLY_NAMES,
    ChannelRecord,
    ChannelState,
    ConnectionState,
    expect_reply,
    negotiate_tune,
)
from ._version import __version__

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

#: RabbitMQ 4.1 refuses a frame_max below 8192 in connection.tune-ok (it closes the
#: socket without a reason); the AMQP minimum of 4096 holds for older brokers.
_RABBITMQ_FRAME_MIN: Final = ((4, 1), 8192)

_DEFAULT_CAPABILITIES: Final[dict[str, object]] = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "exchange_exchange_bindings": True,
    "per_consumer_qos": True,
}


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
        if not 1 <= channel_max <= MAX_SHORT:
            raise ValueError(f"channel_max must be between 1 and 65535, not {channel_max!r}")
        if not FRAME_MIN_SIZE <= frame_max <= MAX_LONG:
            raise ValueError(f"frame_max must be between 4096 and 2**32 - 1, not {frame_max!r}")
        if heartbeat is not None and not 0 <= heartbeat <= MAX_SHORT:
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
        self._frame_limit = PRE_TUNE_FRAME_LIMIT
        self._channels: dict[int, ChannelRecord] = {}
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
        self._send(PROTOCOL_HEADER)

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
        channel = ChannelRecord(channel_id=channel_id, state=ChannelState.OPENING)
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
        channel.forget()
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
            frames = body_frames(body, channel_id, self._frame_max)
            outgoing.extend(frames)
            self._outgoing_size += FRAME_OVERHEAD * len(frames)
        return channel.confirms.published(exchange, routing_key, body, mandatory)

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

    def _require_open_channel(self, channel_id: int, what: str) -> ChannelRecord:
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
        if not self._seen_first_frame:
            if not check_first_bytes(source):
                return 0
            self._seen_first_frame = True
        pos = 0
        unpack = FRAME_HEADER.unpack_from
        closed = ConnectionState.CLOSED
        # Only close() enters CLOSING, never a received frame: decide once.
        closing = self._state is ConnectionState.CLOSING
        with memoryview(source) as view:
            while size_total - pos >= 7:
                frame_type, channel_id, size = unpack(source, pos)
                if frame_type not in FRAME_TYPES:
                    raise RemoteProtocolError(
                        f"the broker sent a frame of unknown type {frame_type} "
                        f"(channel {channel_id})"
                    )
                if size + FRAME_OVERHEAD > self._frame_limit:
                    raise RemoteProtocolError(
                        f"the broker sent a frame of {size + FRAME_OVERHEAD} bytes on channel "
                        f"{channel_id}, more than the frame limit of {self._frame_limit}"
                    )
                end = pos + size + FRAME_OVERHEAD
                if end > size_total:
                    break
                if source[end - 1] != FRAME_END:
                    raise RemoteProtocolError(
                        f"the broker sent a frame (type {frame_type}, channel {channel_id}) "
                        f"that does not end with the frame-end octet 0xCE "
                        f"(got 0x{source[end - 1]:02X})"
                    )
                if closing:
                    self._frame_while_closing(frame_type, channel_id, size, view, pos, end)
                elif frame_type == FRAME_BODY:
                    self._body_frame(channel_id, view[pos + 7 : end - 1].tobytes())
                elif frame_type == FRAME_METHOD:
                    self._method_frame(channel_id, size, view, pos, end)
                elif frame_type == FRAME_HEADER_TYPE:
                    self._header_frame(channel_id, view[pos + 7 : end - 1].tobytes())
                else:
                    self._heartbeat_frame(channel_id, size)
                pos = end
                if self._state is closed:
                    return size_total
        return pos

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
        if frame_type != FRAME_METHOD or channel_id != 0 or size < 4:
            return
        index = METHOD_INDEX.unpack_from(view, start + 7)[0]
        if index not in (CONNECTION_CLOSE_INDEX, CONNECTION_CLOSE_OK_INDEX):
            return
        method = decode(view[start:end].tobytes())
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
            method = decode(view[start:end].tobytes())
            assert isinstance(method, Frame)
            if method.index >> 16 != CONNECTION_CLASS:
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
        method = decode_method(view[start + 7 : end - 1].tobytes())
        if method.index >> 16 == CONNECTION_CLASS:
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
        elif method.name in REPLY_NAMES:
            expect_reply(channel, method)
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
            decode(view[start:end].tobytes())  # raises: too short for a method
        index = METHOD_INDEX.unpack_from(view, start + 7)[0]
        if index == CHANNEL_CLOSE_OK_INDEX:
            if closing:
                del self._channels[channel_id]
                self._events.append(ChannelCloseCompleted(channel_id))
            else:
                self._draining.discard(channel_id)
        elif index == CHANNEL_CLOSE_INDEX and closing:
            # Both sides closed at once. The broker still answers our channel.close
            # with close-ok (RabbitMQ does): keep the id until it arrives.
            self._send(pamqp.frame.marshal(commands.Channel.CloseOk(), channel_id))
            del self._channels[channel_id]
            self._draining.add(channel_id)
            self._events.append(ChannelCloseCompleted(channel_id))

    def _header_frame(self, channel_id: int, payload: bytes) -> None:
        channel = self._content_channel(channel_id, "content header")
        if channel is not None and channel.content_header(channel_id, payload):
            self._events.append(
                channel.content_complete(channel_id, b"", channel.confirms.match_return)
            )

    def _body_frame(self, channel_id: int, payload: bytes) -> None:
        channel = self._content_channel(channel_id, "body frame")
        if channel is None:
            return
        body = channel.content_body(channel_id, payload)
        if body is not None:
            self._events.append(
                channel.content_complete(channel_id, body, channel.confirms.match_return)
            )

    def _content_channel(self, channel_id: int, what: str) -> ChannelRecord | None:
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

    # Connection-class methods -------------------------------------------------------

    def _connection_method(self, method: Frame) -> None:
        state = self._state
        if isinstance(method, commands.Connection.Close):
            self._on_connection_close(method)
            return
        transition = _CONNECTION_TRANSITIONS.get((state, type(method)))
        if transition is None:
            raise RemoteProtocolError(
                f"the broker sent {method.name} while the connection is {state.value}"
            )
        handler, after = transition
        handler(self, method)
        self._state = after

    def _on_start(self, method: Frame) -> None:
        start = cast(commands.Connection.Start, method)
        if (start.version_major, start.version_minor) != (0, 9):
            raise RemoteProtocolError(
                f"the broker proposed AMQP {start.version_major}-{start.version_minor} in "
                "connection.start; strictconsume speaks AMQP 0-9-1"
            )
        offered = text(start.mechanisms).split()
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

    def _on_secure(self, method: Frame) -> None:
        raise RemoteProtocolError(
            f"the broker sent connection.secure (a SASL challenge), which the "
            f"{self._auth_mechanism} mechanism does not use"
        )

    def _on_tune(self, method: Frame) -> None:
        channel_max, frame_max, heartbeat = negotiate_tune(
            cast(commands.Connection.Tune, method),
            channel_max=self._channel_max,
            frame_max=self._frame_max,
            heartbeat=self._wanted_heartbeat,
        )
        self._channel_max = channel_max
        self._frame_max = frame_max
        self._frame_limit = frame_max
        self._heartbeat = heartbeat
        self._send(
            pamqp.frame.marshal(
                commands.Connection.TuneOk(self._channel_max, frame_max, heartbeat), 0
            )
        )
        self._send(pamqp.frame.marshal(commands.Connection.Open(virtual_host=self._vhost), 0))

    def _on_open_ok(self, method: Frame) -> None:
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
                text(close.reply_text),
                close.class_id or 0,
                close.method_id or 0,
            )
        )

    def _on_blocked(self, method: Frame) -> None:
        blocked = cast(commands.Connection.Blocked, method)
        self._events.append(ConnectionBlocked(text(blocked.reason)))

    def _on_unblocked(self, method: Frame) -> None:
        self._events.append(ConnectionUnblocked())

    def _set_closed(self) -> None:
        self._state = ConnectionState.CLOSED
        self._channels.clear()
        self._draining.clear()

    # Channel methods ----------------------------------------------------------------

    def _on_open_ok_channel(self, channel: ChannelRecord, method: Frame) -> None:
        expect_reply(channel, method)
        channel.state = ChannelState.OPEN
        self._events.append(ChannelOpened(channel.channel_id))

    def _on_channel_close(self, channel: ChannelRecord, method: Frame) -> None:
        close = cast(commands.Channel.Close, method)
        channel_id = channel.channel_id
        self._send(pamqp.frame.marshal(commands.Channel.CloseOk(), channel_id))
        del self._channels[channel_id]
        self._events.append(
            ChannelClosedByBroker(
                channel_id,
                close.reply_code or 0,
                text(close.reply_text),
                close.class_id or 0,
                close.method_id or 0,
            )
        )

    def _on_channel_flow(self, channel: ChannelRecord, method: Frame) -> None:
        active = bool(cast(commands.Channel.Flow, method).active)
        self._send(pamqp.frame.marshal(commands.Channel.FlowOk(active), channel.channel_id))
        self._events.append(ChannelFlow(channel.channel_id, active))

    def _on_content_method(self, channel: ChannelRecord, method: Frame) -> None:
        channel.content_method = cast(ContentMethod, method)

    def _on_get_ok(self, channel: ChannelRecord, method: Frame) -> None:
        expect_reply(channel, method)
        channel.content_method = cast(commands.Basic.GetOk, method)

    def _on_cancel(self, channel: ChannelRecord, method: Frame) -> None:
        cancel = cast(commands.Basic.Cancel, method)
        consumer_tag = cancel.consumer_tag or ""
        if not cancel.nowait:
            self._send(
                pamqp.frame.marshal(commands.Basic.CancelOk(consumer_tag), channel.channel_id)
            )
        self._events.append(ConsumerCancelledByBroker(channel.channel_id, consumer_tag))

    def _on_confirm(self, channel: ChannelRecord, method: Frame) -> None:
        confirm = cast("commands.Basic.Ack | commands.Basic.Nack", method)
        tags = channel.confirms.settle(
            confirm.name, channel.channel_id, confirm.delivery_tag or 0, confirm.multiple
        )
        self._events.append(
            PublishConfirmed(channel.channel_id, tags, isinstance(confirm, commands.Basic.Ack))
        )

    # Helpers ------------------------------------------------------------------------

    @staticmethod
    def _merge_client_properties(extra: dict[str, object] | None) -> FieldTable:
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


_ChannelHandler: TypeAlias = Callable[[ProtocolConnection, ChannelRecord, Frame], None]
_ConnectionHandler: TypeAlias = Callable[[ProtocolConnection, Frame], None]

# The tables of ``_state.py`` with their handler names resolved to methods.
_CHANNEL_METHOD_HANDLERS: Final[dict[type[Frame], _ChannelHandler]] = {
    method: getattr(ProtocolConnection, name) for method, name in CHANNEL_METHODS.items()
}
_CONNECTION_TRANSITIONS: Final[
    dict[tuple[ConnectionState, type[Frame]], tuple[_ConnectionHandler, ConnectionState]]
] = {
    key: (getattr(ProtocolConnection, name), after)
    for key, (name, after) in CONNECTION_TRANSITIONS.items()
}
