"""Frames on the wire: where a frame ends, whether the first bytes are AMQP at all,
and the fast decoders of the frames every delivery is made of.

pamqp encodes and decodes every frame; this module only reads the 7-byte frame header
(type, channel, size) with ``struct`` to know where a frame ends before handing
exactly that frame to pamqp. Nothing here keeps state: the facade (``_protocol.py``)
owns the buffer, its ``ConnectionRecord`` the frame limit.
"""

from __future__ import annotations

import struct
from typing import Final

import pamqp.frame
from pamqp import commands, constants, header
from pamqp.base import Frame
from pamqp.body import ContentBody

from ._codec import decode_content_header
from ._errors import RemoteProtocolError

__all__ = [
    "BASIC_CLASS",
    "CONNECTION_CLASS",
    "CONTENT_PREFIX",
    "DELIVER_INDEX",
    "FRAME_BODY",
    "FRAME_END",
    "FRAME_HEADER",
    "FRAME_HEADER_TYPE",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "FRAME_MIN_SIZE",
    "FRAME_OVERHEAD",
    "FRAME_TYPES",
    "MAX_LONG",
    "MAX_LONGLONG",
    "MAX_SHORT",
    "METHOD_INDEX",
    "PRE_TUNE_FRAME_LIMIT",
    "PROTOCOL_HEADER",
    "body_frames",
    "check_first_bytes",
    "decode",
    "decode_header",
    "decode_method",
    "deliver_fields",
]

FRAME_HEADER: Final = struct.Struct(">BHI")
METHOD_INDEX: Final = struct.Struct(">I")
CONTENT_PREFIX: Final = struct.Struct(">H2xQ")  # class id, (weight), body size
FRAME_METHOD: Final = constants.FRAME_METHOD
FRAME_HEADER_TYPE: Final = constants.FRAME_HEADER
FRAME_BODY: Final = constants.FRAME_BODY
FRAME_HEARTBEAT: Final = constants.FRAME_HEARTBEAT
FRAME_TYPES: Final = frozenset({FRAME_METHOD, FRAME_HEADER_TYPE, FRAME_BODY, FRAME_HEARTBEAT})
FRAME_END: Final = constants.FRAME_END
FRAME_OVERHEAD: Final = 8  # 7 header bytes and the frame-end octet
FRAME_MIN_SIZE: Final = constants.FRAME_MIN_SIZE
#: The frame limit before connection.tune: connection.start may exceed the 4096 bytes
#: every peer must accept.
PRE_TUNE_FRAME_LIMIT: Final = 131072
CONNECTION_CLASS: Final = commands.Connection.frame_id
BASIC_CLASS: Final = commands.Basic.frame_id
MAX_SHORT: Final = 65535
MAX_LONG: Final = 2**32 - 1
MAX_LONGLONG: Final = 2**64 - 1
PROTOCOL_HEADER: Final = header.ProtocolHeader().marshal()


def check_first_bytes(source: bytes | bytearray) -> bool:
    """Check that the broker's first bytes start an AMQP 0-9-1 frame.

    Returns:
        True once the first frame header is known to be plausible; False when
        more bytes are needed to tell.

    Raises:
        RemoteProtocolError: The broker answered with its own protocol header (it
            does not speak 0-9-1), or the bytes are not AMQP at all.
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
    if head[0] == FRAME_METHOD and len(head) < 7:
        return False
    if head[0] != FRAME_METHOD or head[1:3] != b"\x00\x00":
        raise RemoteProtocolError(
            f"the peer does not speak AMQP 0-9-1: it sent {bytes(source[:32])!r}; "
            "is the port an AMQP port?"
        )
    return True


def decode(frame: bytes) -> object:
    """Decode one whole frame with pamqp; any failure is the broker's."""
    try:
        return pamqp.frame.unmarshal(frame)[2]
    except Exception as exc:
        raise RemoteProtocolError(f"the broker sent a frame that cannot be decoded: {exc}") from exc


# The two decoders below are the hot path (every delivery is a method frame, a
# content header and a body frame). They do what pamqp.frame.unmarshal does for
# their frame type, with pamqp's own classes, minus its generic part: the caller has
# checked the frame header and the frame-end octet already, and unmarshal would
# first try the frame as a protocol header, then parse its header again.


def decode_method(payload: bytes) -> Frame:
    """Decode a method frame's payload: the method index, then its arguments."""
    try:
        index = METHOD_INDEX.unpack_from(payload)[0]
        if index == DELIVER_INDEX:
            return _decode_deliver(payload)
        method: Frame = commands.INDEX_MAPPING[index]()
        method.unmarshal(payload[4:])
    except Exception as exc:
        raise RemoteProtocolError(
            f"the broker sent a frame that cannot be decoded: {exc!r}"
        ) from exc
    return method


DELIVER_INDEX: Final = commands.Basic.Deliver.index
# The delivery tag as pamqp reads a long-long (signed), then the octet of the bits.
_TAG_AND_BITS: Final = struct.Struct(">qB")


def deliver_fields(payload: bytes) -> tuple[str, int, bool, str, str]:
    """basic.deliver's arguments from its method frame's payload (the 4-byte method
    index first): consumer tag, delivery tag, redelivered, exchange, routing key.

    What ``Frame.unmarshal`` does for basic.deliver (checked equal for any values and
    any truncation), read in the method's field order with offsets into the payload,
    where pamqp looks each field's decoder up by name and type and copies the rest of
    the payload for every field (two thirds of a delivery's method decoding). Like
    ``unmarshal``, the values are taken as they come (no ``validate()``: a broker's
    exchange name is not ours to refuse), and a short string cut short by the end of
    the payload is read as far as it goes.

    Raises:
        ValueError, IndexError, struct.error, UnicodeDecodeError: the payload is too
            short for its fields, or a string is not UTF-8.
    """
    pos = 5 + payload[4]
    consumer_tag = payload[5:pos].decode("utf-8")
    delivery_tag, bits = _TAG_AND_BITS.unpack_from(payload, pos)
    pos += 10  # past the tag, the bits and the exchange's length
    end = pos + payload[pos - 1]
    exchange = payload[pos:end].decode("utf-8")
    routing_key = payload[end + 1 : end + 1 + payload[end]].decode("utf-8")
    return consumer_tag, delivery_tag, bits & 1 != 0, exchange, routing_key


def _decode_deliver(payload: bytes) -> commands.Basic.Deliver:
    """basic.deliver, the method of every message consumed, as pamqp's class."""
    consumer_tag, delivery_tag, redelivered, exchange, routing_key = deliver_fields(payload)
    method = commands.Basic.Deliver.__new__(commands.Basic.Deliver)
    method.consumer_tag = consumer_tag
    method.delivery_tag = delivery_tag
    method.redelivered = redelivered
    method.exchange = exchange
    method.routing_key = routing_key
    return method


def decode_header(payload: bytes) -> tuple[int, int, commands.Basic.Properties]:
    """Decode a content header frame's payload: class, body size, properties (by
    ``_codec``, which reads timestamps and header tables as pamqp does not)."""
    try:
        return decode_content_header(payload)
    except Exception as exc:
        raise RemoteProtocolError(
            f"the broker sent a frame that cannot be decoded: {exc!r}"
        ) from exc


def body_frames(body: bytes, channel_id: int, frame_max: int) -> list[bytes]:
    """A message body as body frames of at most ``frame_max`` bytes each (none for an
    empty body)."""
    size = len(body)
    if not size:
        return []
    chunk_max = frame_max - FRAME_OVERHEAD
    marshal = pamqp.frame.marshal
    return [
        marshal(
            ContentBody(body if size <= chunk_max else body[start : start + chunk_max]), channel_id
        )
        for start in range(0, size, chunk_max)
    ]
