"""What the core does with each frame the broker sends: the frame loop, where each
frame may go, and the methods the broker sends on a channel.

:func:`parse_frames` handles every complete frame of the bytes the facade
(``_protocol.py``) buffered, on the :class:`ConnectionRecord` it owns, and says how
many bytes it used; the facade keeps the rest. Connection-class methods go on to
``_handshake.py``, content frames to the channel's assembly (``_content.py``),
confirms to its :class:`PublishConfirms` (``_confirms.py``).
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
# A whole delivery (basic.deliver, its content header and one body frame with the
# whole body, all complete in the buffer, on an open channel with no content under
# way) is taken in one step by _whole_delivery, with the general path's checks; any
# other shape goes through the general path one frame at a time, which alone raises.
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

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeAlias, cast

import pamqp.frame
from pamqp import commands
from pamqp.base import Frame

from ._codec import decode_content_header
from ._content import ContentMethod
from ._errors import RemoteProtocolError
from ._events import (
    ChannelCloseCompleted,
    ChannelClosedByBroker,
    ChannelFlow,
    ChannelOpened,
    ConnectionCloseCompleted,
    ConsumerCancelledByBroker,
    Delivery,
    HeartbeatReceived,
    MethodReceived,
    PublishConfirmed,
    text,
)
from ._framing import (
    BASIC_CLASS,
    CONNECTION_CLASS,
    CONTENT_PREFIX,
    DELIVER_INDEX,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEADER_TYPE,
    FRAME_METHOD,
    FRAME_OVERHEAD,
    FRAME_TYPES,
    METHOD_INDEX,
    decode,
    decode_method,
    deliver_fields,
)
from ._handshake import connection_method, on_connection_close
from ._state import (
    CHANNEL_CLOSE_INDEX,
    CHANNEL_CLOSE_OK_INDEX,
    CHANNEL_METHODS,
    CONNECTION_CLOSE_INDEX,
    CONNECTION_CLOSE_OK_INDEX,
    REPLY_NAMES,
    ChannelRecord,
    ChannelState,
    ConnectionRecord,
    ConnectionState,
    expect_reply,
)

__all__ = ["parse_frames"]


def parse_frames(conn: ConnectionRecord, source: bytes | bytearray) -> int:
    """Handle every complete frame in ``source``; return how many bytes were used.

    The events go to ``conn.events``, the answers to ``conn``'s output. Stops after
    the frame that closed the connection.

    Raises:
        RemoteProtocolError: The broker broke the protocol.
        LocalProtocolError: The broker offers no authentication mechanism we were
            configured for.
    """
    size_total = len(source)
    pos = 0
    unpack = FRAME_HEADER.unpack_from
    index_of = METHOD_INDEX.unpack_from
    closed = ConnectionState.CLOSED
    # Only close() enters CLOSING, never a received frame: decide once.
    closing = conn.state is ConnectionState.CLOSING
    with memoryview(source) as view:
        while size_total - pos >= 7:
            frame_type, channel_id, size = unpack(source, pos)
            if frame_type not in FRAME_TYPES:
                raise RemoteProtocolError(
                    f"the broker sent a frame of unknown type {frame_type} (channel {channel_id})"
                )
            if size + FRAME_OVERHEAD > conn.frame_limit:
                raise RemoteProtocolError(
                    f"the broker sent a frame of {size + FRAME_OVERHEAD} bytes on channel "
                    f"{channel_id}, more than the frame limit of {conn.frame_limit}"
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
                _frame_while_closing(conn, frame_type, channel_id, size, view, pos, end)
            elif frame_type == FRAME_BODY:
                _body_frame(conn, channel_id, view[pos + 7 : end - 1].tobytes())
            elif frame_type == FRAME_METHOD:
                if channel_id and size >= 4 and index_of(source, pos + 7)[0] == DELIVER_INDEX:
                    after = _whole_delivery(conn, channel_id, source, view, pos, end, size_total)
                    if after:
                        pos = after
                        continue
                _method_frame(conn, channel_id, size, view, pos, end)
            elif frame_type == FRAME_HEADER_TYPE:
                _header_frame(conn, channel_id, view[pos + 7 : end - 1].tobytes())
            else:
                _heartbeat_frame(conn, channel_id, size)
            pos = end
            if conn.state is closed:
                return size_total
    return pos


def _whole_delivery(
    conn: ConnectionRecord,
    channel_id: int,
    source: bytes | bytearray,
    view: memoryview,
    start: int,
    end: int,
    size_total: int,
) -> int:
    """The common shape of a delivery, handled at once: basic.deliver (the frame at
    ``start``, checked by the loop), its content header and one body frame holding the
    whole body (or none for an empty body), all complete in ``source``, on an open
    channel with no content in progress. Returns the offset after its last frame, or
    0 when the frames are of any other shape, for the general path to take them one
    by one (and raise its errors, or find the content_error of properties that cannot
    be decoded). Nothing is changed before the delivery is known whole and valid.

    The checks are those of the general path for these frames: the frame limit and
    frame-end octet of each, the header's class, a body of exactly the announced size.
    """
    channel = conn.channels.get(channel_id)
    if (
        channel is None
        or channel.state is not ChannelState.OPEN
        or channel.content_method is not None
        or size_total - end < 7
    ):
        return 0
    unpack = FRAME_HEADER.unpack_from
    limit = conn.frame_limit
    frame_type, frame_channel, size = unpack(source, end)
    header_end = end + size + FRAME_OVERHEAD
    if (
        frame_type != FRAME_HEADER_TYPE
        or frame_channel != channel_id
        or size < 14  # class, weight, body size, property flags
        or size + FRAME_OVERHEAD > limit
        or header_end > size_total
        or source[header_end - 1] != FRAME_END
    ):
        return 0
    # The shape first, the decoding last: a body over several frames (or not read
    # yet) is declined before anything is decoded twice.
    class_id, body_size = CONTENT_PREFIX.unpack_from(source, end + 7)
    if class_id != BASIC_CLASS:
        return 0
    if body_size:
        if size_total - header_end < 7:
            return 0
        frame_type, frame_channel, size = unpack(source, header_end)
        last: int = header_end + size + FRAME_OVERHEAD
        if (
            frame_type != FRAME_BODY
            or frame_channel != channel_id
            or size != body_size
            or size + FRAME_OVERHEAD > limit
            or last > size_total
            or source[last - 1] != FRAME_END
        ):
            return 0
    else:
        last = header_end
    try:
        properties = decode_content_header(view[end + 7 : header_end - 1].tobytes())[2]
        consumer_tag, delivery_tag, redelivered, exchange, routing_key = deliver_fields(
            view[start + 7 : end - 1].tobytes()
        )
    except Exception:
        return 0
    body = view[header_end + 7 : last - 1].tobytes() if body_size else b""
    conn.events.append(
        Delivery(
            channel_id,
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            properties,
            body,
        )
    )
    return last


def _frame_while_closing(
    conn: ConnectionRecord,
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
        on_connection_close(conn, method)
    else:
        conn.set_closed()
        conn.events.append(ConnectionCloseCompleted())


def _heartbeat_frame(conn: ConnectionRecord, channel_id: int, size: int) -> None:
    if channel_id != 0 or size != 0:
        raise RemoteProtocolError(
            f"the broker sent a malformed heartbeat frame (channel {channel_id}, "
            f"{size} payload bytes; a heartbeat has channel 0 and no payload)"
        )
    conn.events.append(HeartbeatReceived())


def _method_frame(
    conn: ConnectionRecord, channel_id: int, size: int, view: memoryview, start: int, end: int
) -> None:
    if channel_id == 0:
        method = decode(view[start:end].tobytes())
        assert isinstance(method, Frame)
        if method.index >> 16 != CONNECTION_CLASS:
            raise RemoteProtocolError(
                f"the broker sent {method.name} on channel 0, which carries only "
                "connection-class methods"
            )
        connection_method(conn, method)
        return
    channel = conn.channels.get(channel_id)
    if channel is None or channel.state is ChannelState.CLOSING:
        _method_for_closed_channel(conn, channel_id, size, view, start, end)
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
        handler(conn, channel, method)
    elif method.name in REPLY_NAMES:
        expect_reply(channel, method)
        conn.events.append(MethodReceived(channel_id, method))
    else:
        raise RemoteProtocolError(
            f"the broker sent {method.name} on channel {channel_id}, a method only a client sends"
        )


def _method_for_closed_channel(
    conn: ConnectionRecord, channel_id: int, size: int, view: memoryview, start: int, end: int
) -> None:
    """A method for a channel we are closing (or whose close crossed the broker's):
    only channel.close and channel.close-ok matter."""
    closing = channel_id in conn.channels
    if not closing and channel_id not in conn.draining:
        raise RemoteProtocolError(
            f"the broker sent a method frame for channel {channel_id}, which is not open"
        )
    if size < 4:
        decode(view[start:end].tobytes())  # raises: too short for a method
    index = METHOD_INDEX.unpack_from(view, start + 7)[0]
    if index == CHANNEL_CLOSE_OK_INDEX:
        if closing:
            del conn.channels[channel_id]
            conn.events.append(ChannelCloseCompleted(channel_id))
        else:
            conn.draining.discard(channel_id)
    elif index == CHANNEL_CLOSE_INDEX and closing:
        # Both sides closed at once. The broker still answers our channel.close
        # with close-ok (RabbitMQ does): keep the id until it arrives.
        conn.send(pamqp.frame.marshal(commands.Channel.CloseOk(), channel_id))
        del conn.channels[channel_id]
        conn.draining.add(channel_id)
        conn.events.append(ChannelCloseCompleted(channel_id))


def _header_frame(conn: ConnectionRecord, channel_id: int, payload: bytes) -> None:
    channel = _content_channel(conn, channel_id, "content header")
    if channel is not None and channel.content_header(channel_id, payload):
        conn.events.append(channel.content_complete(channel_id, b"", channel.confirms.match_return))


def _body_frame(conn: ConnectionRecord, channel_id: int, payload: bytes) -> None:
    channel = _content_channel(conn, channel_id, "body frame")
    if channel is None:
        return
    body = channel.content_body(channel_id, payload)
    if body is not None:
        conn.events.append(
            channel.content_complete(channel_id, body, channel.confirms.match_return)
        )


def _content_channel(conn: ConnectionRecord, channel_id: int, what: str) -> ChannelRecord | None:
    """The channel a content frame belongs to; None when it is to be dropped."""
    channel = conn.channels.get(channel_id)
    if channel is None:
        if channel_id in conn.draining:
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


# Channel methods ------------------------------------------------------------------


def _on_open_ok_channel(conn: ConnectionRecord, channel: ChannelRecord, method: Frame) -> None:
    expect_reply(channel, method)
    channel.state = ChannelState.OPEN
    conn.events.append(ChannelOpened(channel.channel_id))


def _on_channel_close(conn: ConnectionRecord, channel: ChannelRecord, method: Frame) -> None:
    close = cast(commands.Channel.Close, method)
    channel_id = channel.channel_id
    conn.send(pamqp.frame.marshal(commands.Channel.CloseOk(), channel_id))
    del conn.channels[channel_id]
    conn.events.append(
        ChannelClosedByBroker(
            channel_id,
            close.reply_code or 0,
            text(close.reply_text),
            close.class_id or 0,
            close.method_id or 0,
        )
    )


def _on_channel_flow(conn: ConnectionRecord, channel: ChannelRecord, method: Frame) -> None:
    active = bool(cast(commands.Channel.Flow, method).active)
    conn.send(pamqp.frame.marshal(commands.Channel.FlowOk(active), channel.channel_id))
    conn.events.append(ChannelFlow(channel.channel_id, active))


def _on_content_method(conn: ConnectionRecord, channel: ChannelRecord, method: Frame) -> None:
    channel.content_method = cast(ContentMethod, method)


def _on_get_ok(conn: ConnectionRecord, channel: ChannelRecord, method: Frame) -> None:
    expect_reply(channel, method)
    channel.content_method = cast(commands.Basic.GetOk, method)


def _on_cancel(conn: ConnectionRecord, channel: ChannelRecord, method: Frame) -> None:
    cancel = cast(commands.Basic.Cancel, method)
    consumer_tag = cancel.consumer_tag or ""
    if not cancel.nowait:
        conn.send(pamqp.frame.marshal(commands.Basic.CancelOk(consumer_tag), channel.channel_id))
    conn.events.append(ConsumerCancelledByBroker(channel.channel_id, consumer_tag))


def _on_confirm(conn: ConnectionRecord, channel: ChannelRecord, method: Frame) -> None:
    confirm = cast("commands.Basic.Ack | commands.Basic.Nack", method)
    tags = channel.confirms.settle(
        confirm.name, channel.channel_id, confirm.delivery_tag or 0, confirm.multiple
    )
    conn.events.append(
        PublishConfirmed(channel.channel_id, tags, isinstance(confirm, commands.Basic.Ack))
    )


_ChannelHandler: TypeAlias = Callable[[ConnectionRecord, ChannelRecord, Frame], None]

# The table of ``_state.py`` with its handler names resolved to this module's functions.
_CHANNEL_METHOD_HANDLERS: Final[dict[type[Frame], _ChannelHandler]] = {
    method: globals()[name] for method, name in CHANNEL_METHODS.items()
}
