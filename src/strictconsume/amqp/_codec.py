"""Message properties and header tables: the parts of the codec pamqp gets wrong.

A consumer sits among services written in Go (amqp091-go), Java (RabbitMQ's client)
and Node (amqplib). Their headers must reach a handler as the values they sent, and a
retry or dead-letter copy must carry them exactly, field type for field type, since a
Java ``(Long)`` cast or a Go ``.(int64)`` assertion on a dead letter fails on an
``int`` of another width. pamqp (which encodes and decodes every other frame) gets
four things wrong for that, so the content header's properties are decoded and
encoded here, with pamqp's own primitives (``pamqp.encode``, ``pamqp.decode``,
``pamqp.common.Struct``) for every value it gets right:

* **Timestamps are seconds** (AMQP 0-9-1, section 4.2.5.4), whatever their size.
  pamqp reads one above 2**32 as milliseconds (2200-01-01 arrives as 1970-03-26) and
  encodes it back divided by 1000. Here a timestamp is a signed 64-bit count of
  seconds, as Java and Go read it: a :class:`datetime.datetime` in UTC when Python can
  hold it (years 1 to 9999), else a :class:`Timestamp` carrying the integer, so that
  such a message still reaches its handler rather than being dead-lettered.
* **Integers are published signed.** pamqp encodes ints in 32768..65535 and
  2**31..2**32-1 as the unsigned types 'u' and 'i', which amqp091-go and the Java
  client cannot read (they close the connection). Here a Python ``int`` becomes the
  smallest of 'b', 's', 'I', 'l' that holds it; beyond int64 is a ``ValueError``.
* **Floats are published as doubles** ('d', as Java, .NET and pika send them): pamqp
  narrows them to single precision, which changes 0.1 and cannot encode 1e300.
* **Copies keep the wire encoding.** A header table as received is a :class:`Headers`,
  a ``dict`` that remembers the table's encoded bytes; encoding it again writes each
  entry whose value is still the one received byte for byte, so a Java ``Integer``
  1000 stays an 'I' (not the 's' the smallest type would be), a ``Long`` 5 an 'l', a
  long string that is not UTF-8 an 'S' (pamqp hands it over as ``bytes``, which would
  otherwise go out as a byte array 'x'), a single-precision float an 'f'. Only the
  entries added or changed are encoded from their Python values.

What we publish therefore uses only the field types every major client reads ('t',
'b', 's', 'I', 'l', 'd', 'D', 'S', 'x', 'T', 'F', 'A', 'V'; the RabbitMQ Java
client's set), except in a copy, which keeps whatever the original carried. The
README's "Header and property types" table lists both directions.

Decoding reads the unsigned types others send ('B', 'u', 'i'), 'L', 'f' and the
void pamqp also accepts (a zero tag byte). A field type outside that set, a header
name or a short-string property that is not UTF-8, or a table whose lengths do not
add up is a ``ValueError``: the delivery is then handed on with empty properties and
``properties_error`` (see ``_protocol``), for the consumer to reject it to its
dead-letter queue with its raw properties intact.
"""

from __future__ import annotations

import calendar
import datetime
import decimal
import math
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
from pamqp import commands, header
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode
from pamqp.common import Struct

__all__ = [
    "Headers",
    "Timestamp",
    "content_header",
    "decode_content_header",
    "decode_properties",
    "decode_table",
    "encode_properties",
    "encode_table",
    "encode_value",
]

_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_SECOND: Final = datetime.timedelta(seconds=1)
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_TIMESTAMP: Final = struct.Struct(">q")  # signed, as Java (readLong) and Go read it
_CONTENT_PREFIX: Final = struct.Struct(">HHQ")  # class id, weight, body size
_FLAGS: Final = struct.Struct(">H")


@attrs.frozen
class Timestamp:
    """An AMQP timestamp that :class:`datetime.datetime` cannot hold (before year 1 or
    after 9999): the signed count of seconds since 1970-01-01T00:00:00Z.

    A handler receives one of these where a header or the ``timestamp`` property holds
    such a value (a "never expires" sentinel such as 2**63-1 seconds, say), rather than
    the message being dead-lettered; a copy sends it on unchanged, and publishing one
    sends a timestamp ('T') of exactly ``seconds``.
    """

    seconds: int = attrs.field()

    @seconds.validator
    def _check(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Timestamp seconds must be an int, not {value!r}")
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"Timestamp seconds must fit in 64 signed bits, not {value!r}")


class Headers(dict[str, Any]):
    """A header table as received: the decoded values, and the table's encoded bytes.

    It is an ordinary ``dict`` to its user. :func:`encode_table` writes each entry
    whose value is still the one decoded from ``wire`` as it was received (the field
    type the publisher chose), and encodes only the others from their Python values.
    ``copy()`` keeps the encoded bytes; ``dict(headers)`` does not.
    """

    __slots__ = ("wire",)

    def __init__(self, values: Mapping[str, Any] | None = None, wire: bytes = b"") -> None:
        super().__init__(values or {})
        #: The encoded table, its 4-byte length included (empty: encode every value).
        self.wire = wire

    def copy(self) -> Headers:
        return Headers(self, self.wire)


# Decoding ------------------------------------------------------------------------
#
# Offsets into one bytes object rather than pamqp's slices of the rest of the frame
# (pamqp copies the remainder of the table for every value it reads), with pamqp's
# struct formats. Every reader returns (value, offset after it).


def _timestamp_value(seconds: int) -> datetime.datetime | Timestamp:
    try:
        return _EPOCH + datetime.timedelta(seconds=seconds)
    except OverflowError:
        return Timestamp(seconds)


def _fixed(unpack: Callable[[bytes, int], tuple[Any, ...]], size: int) -> _Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        return unpack(data, pos)[0], pos + size

    return read


def _read_long_string(data: bytes, pos: int) -> tuple[str | bytes, int]:
    end = pos + 4 + Struct.integer.unpack_from(data, pos)[0]
    if end > len(data):
        raise ValueError("a long string runs past the end of its table")
    raw = data[pos + 4 : end]
    try:
        return raw.decode("utf-8"), end
    except UnicodeDecodeError:
        return raw, end  # as pamqp does: bytes tell it from a byte array (bytearray)


def _read_byte_array(data: bytes, pos: int) -> tuple[bytearray, int]:
    end = pos + 4 + Struct.integer.unpack_from(data, pos)[0]
    if end > len(data):
        raise ValueError("a byte array runs past the end of its table")
    return bytearray(data[pos + 4 : end]), end


def _read_decimal(data: bytes, pos: int) -> tuple[decimal.Decimal, int]:
    if pos + 5 > len(data):
        raise ValueError("a decimal runs past the end of its table")
    return pamqp_decode.decimal(data[pos : pos + 5])[1], pos + 5


def _read_timestamp(data: bytes, pos: int) -> tuple[datetime.datetime | Timestamp, int]:
    return _timestamp_value(_TIMESTAMP.unpack_from(data, pos)[0]), pos + 8


def _read_void(data: bytes, pos: int) -> tuple[None, int]:
    return None, pos


def _read_bool(data: bytes, pos: int) -> tuple[bool, int]:
    return data[pos] != 0, pos + 1


def _read_table(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    end = pos + 4 + Struct.integer.unpack_from(data, pos)[0]
    if end > len(data):
        raise ValueError("a field table runs past the end of its frame")
    return _table_entries(data, pos + 4, end), end


def _table_entries(data: bytes, pos: int, end: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    readers = _READERS
    while pos < end:
        key_end = pos + 1 + data[pos]
        key = data[pos + 1 : key_end].decode("utf-8")
        if key_end >= end:
            raise ValueError("a header name runs past the end of its table")
        reader = readers.get(data[key_end])
        if reader is None:
            tag = data[key_end : key_end + 1]
            raise ValueError(f"header {key!r} has an unknown field type {tag!r}")
        table[key], pos = reader(data, key_end + 1)
    if pos != end:
        raise ValueError("a field table's entries run past its length")
    return table


def _read_array(data: bytes, pos: int) -> tuple[list[Any], int]:
    end = pos + 4 + Struct.integer.unpack_from(data, pos)[0]
    if end > len(data):
        raise ValueError("a field array runs past the end of its table")
    pos += 4
    items: list[Any] = []
    readers = _READERS
    while pos < end:
        reader = readers.get(data[pos])
        if reader is None:
            tag = data[pos : pos + 1]
            raise ValueError(f"a field array holds an unknown field type {tag!r}")
        item, pos = reader(data, pos + 1)
        items.append(item)
    if pos != end:
        raise ValueError("a field array's values run past its length")
    return items, end


_Reader = Callable[[bytes, int], tuple[Any, int]]

# The field types of RabbitMQ's errata (https://www.rabbitmq.com/amqp-0-9-1-errata.html)
# as pamqp reads them, 'T' excepted.
_READERS: Final[dict[int, _Reader]] = {
    ord("t"): _read_bool,
    ord("b"): _fixed(Struct.short_short_int.unpack_from, 1),
    ord("B"): _fixed(Struct.short_short_uint.unpack_from, 1),
    ord("s"): _fixed(Struct.short.unpack_from, 2),
    ord("u"): _fixed(Struct.ushort.unpack_from, 2),
    ord("I"): _fixed(Struct.long.unpack_from, 4),
    ord("i"): _fixed(Struct.ulong.unpack_from, 4),
    ord("l"): _fixed(Struct.long_long_int.unpack_from, 8),
    ord("L"): _fixed(Struct.long_long_int.unpack_from, 8),
    ord("f"): _fixed(Struct.float.unpack_from, 4),
    ord("d"): _fixed(Struct.double.unpack_from, 8),
    ord("D"): _read_decimal,
    ord("S"): _read_long_string,
    ord("x"): _read_byte_array,
    ord("T"): _read_timestamp,
    ord("F"): _read_table,
    ord("A"): _read_array,
    ord("V"): _read_void,
    0: _read_void,  # not in the errata; pamqp reads it ("seen in the wild")
}


def decode_table(data: bytes, pos: int = 0) -> tuple[Headers, int]:
    """Decode the field table at ``data[pos:]`` (its 4-byte length first).

    Returns:
        The table as :class:`Headers` (remembering its encoded bytes) and the offset
        after it.

    Raises:
        ValueError: the table is malformed, holds an unknown field type, or a name
            that is not UTF-8.
    """
    try:
        values, end = _read_table(data, pos)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"a field table is truncated ({exc})") from exc
    return Headers(values, data[pos:end]), end


def _read_short_string(data: bytes, pos: int) -> tuple[str, int]:
    end = pos + 1 + data[pos]
    if end > len(data):
        raise ValueError("a short string runs past the end of the content header")
    return data[pos + 1 : end].decode("utf-8"), end


def _read_octet(data: bytes, pos: int) -> tuple[int, int]:
    return data[pos], pos + 1


def _read_headers(data: bytes, pos: int) -> tuple[Headers, int]:
    return decode_table(data, pos)


_PROPERTY_READERS: Final[dict[str, _Reader]] = {
    "shortstr": _read_short_string,
    "octet": _read_octet,
    "table": _read_headers,
    "timestamp": _read_timestamp,
}
# (name, flag bit, AMQP type) in the order the properties are encoded
_PROPERTIES: Final = tuple(
    (
        name,
        commands.Basic.Properties.flags[name],
        commands.Basic.Properties.amqp_type(name),
    )
    for name in commands.Basic.Properties.attributes()
)


_Plan = tuple[tuple[str, _Reader], ...]
# The readers for each flags value seen, in encoding order: a few flag sets cover
# almost every message (a publisher sets the same properties each time), so the walk
# over all 14 properties is done once per set, keyed by the property bits alone
# (not the continuation bit, not further flag words), and kept only once its values
# decoded. Bounded: past _PLANS_MAX distinct sets a plan is made for each call.
_PLANS: Final[dict[int, _Plan]] = {}
_PLANS_MAX: Final = 256
_PROPERTY_BITS: Final = sum(flag for _, flag, _ in _PROPERTIES)


def _plan(flags: int) -> _Plan:
    return tuple(
        (name, _PROPERTY_READERS[kind]) for name, flag, kind in _PROPERTIES if flags & flag
    )


_new: Final = object.__new__
_Properties: Final = commands.Basic.Properties


def _blank_properties() -> commands.Basic.Properties:
    """``Basic.Properties()`` without its ``validate()``, which checks only values
    set in the constructor (none here). As in pamqp's own ``ContentHeader.unmarshal``,
    values decoded from the wire are set as they come, unvalidated: a broker's
    delivery_mode 3 or cluster_id is not ours to refuse."""
    properties = _new(_Properties)
    properties.content_type = None
    properties.content_encoding = None
    properties.headers = None
    properties.delivery_mode = None
    properties.priority = None
    properties.correlation_id = None
    properties.reply_to = None
    properties.expiration = None
    properties.message_id = None
    properties.timestamp = None
    properties.message_type = None
    properties.user_id = None
    properties.app_id = None
    properties.cluster_id = ""
    return properties


def decode_properties(data: bytes, pos: int = 0) -> commands.Basic.Properties:
    """Decode the property flags and values at ``data[pos:]`` into pamqp's
    ``Basic.Properties`` (headers as :class:`Headers`; timestamps per the module notes).

    Raises:
        ValueError: a value cannot be decoded (see the module notes).
    """
    try:
        (partial,) = _FLAGS.unpack_from(data, pos)
        pos += 2
        # The properties of the basic class are bits 15 to 2 of the first flag word;
        # its lowest bit says another word follows, and those name no property.
        flags = partial & _PROPERTY_BITS
        while partial & 1:
            (partial,) = _FLAGS.unpack_from(data, pos)
            pos += 2
        properties = _blank_properties()
        if not flags:
            return properties
        cached = _PLANS.get(flags)
        plan = _plan(flags) if cached is None else cached
        for name, reader in plan:
            value, pos = reader(data, pos)
            setattr(properties, name, value)
        if cached is None and len(_PLANS) < _PLANS_MAX:
            _PLANS[flags] = plan  # only a flag set whose values decoded
    except (struct.error, IndexError) as exc:
        raise ValueError(f"the message properties are truncated ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"a property or header name is not UTF-8 ({exc})") from exc
    return properties


def decode_content_header(payload: bytes) -> tuple[int, int, commands.Basic.Properties]:
    """Decode a content header frame's payload: (class id, body size, properties).

    Raises:
        ValueError: the payload is too short or its properties cannot be decoded.
    """
    if len(payload) < 14:
        raise ValueError(f"a content header of {len(payload)} bytes is too short")
    class_id, _, body_size = _CONTENT_PREFIX.unpack_from(payload)
    return class_id, body_size, decode_properties(payload, 12)


# Encoding ------------------------------------------------------------------------


def _timestamp_seconds(value: object) -> int:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=datetime.UTC)  # naive means UTC, as in pamqp
        return (value - _EPOCH) // _SECOND  # floor: 1969-12-31T23:59:59.5 is -1
    if isinstance(value, Timestamp):
        return value.seconds
    if isinstance(value, time.struct_time):
        return calendar.timegm(value)
    raise TypeError(f"a timestamp must be a datetime or a Timestamp, not {value!r}")


def encode_value(value: object) -> bytes:
    """One field value with its type tag, as the module notes say (floats as 'd',
    ints in the smallest signed type, ``bytes`` and ``bytearray`` as 'x').

    Raises:
        ValueError: an int beyond 64 signed bits, an infinite or NaN float (RabbitMQ
            closes the channel on one), a Decimal beyond AMQP's range, a string longer
            than 4 GiB.
        TypeError: a value of a type AMQP has no field type for.
    """
    if isinstance(value, str):
        return b"S" + pamqp_encode.long_string(value)
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        if -128 <= value <= 127:
            return b"b" + Struct.short_short_int.pack(value)
        if -32768 <= value <= 32767:
            return b"s" + pamqp_encode.short_int(value)
        if -2147483648 <= value <= 2147483647:
            return b"I" + pamqp_encode.long_int(value)
        if _INT64_MIN <= value <= _INT64_MAX:
            return b"l" + pamqp_encode.long_long_int(value)
        raise ValueError(f"the int {value} is beyond the 64 signed bits AMQP can carry")
    if isinstance(value, float):
        if not math.isfinite(value):  # RabbitMQ fails the channel (541) on reading one
            raise ValueError(f"RabbitMQ cannot carry the float {value} in a header")
        return b"d" + pamqp_encode.double(value)
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, list | tuple):
        data = b"".join([encode_value(item) for item in value])
        return b"A" + Struct.integer.pack(len(data)) + data
    if value is None:
        return b"V"
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return b"x" + Struct.integer.pack(len(raw)) + raw
    if isinstance(value, datetime.datetime | Timestamp | time.struct_time):
        return b"T" + _TIMESTAMP.pack(_timestamp_seconds(value))
    if isinstance(value, decimal.Decimal):
        try:
            return b"D" + pamqp_encode.decimal(value)
        except TypeError as exc:  # pamqp's range errors
            raise ValueError(f"the Decimal {value} cannot be encoded: {exc}") from exc
    raise TypeError(f"AMQP has no field type for {type(value).__name__} {value!r}")


def _received_entries(wire: bytes) -> dict[str, tuple[bytes, Any]]:
    """Name -> (encoded entry after the name, decoded value) of an encoded table."""
    entries: dict[str, tuple[bytes, Any]] = {}
    pos, end = 4, len(wire)
    while pos < end:
        key_end = pos + 1 + wire[pos]
        value, after = _READERS[wire[key_end]](wire, key_end + 1)
        entries[wire[pos + 1 : key_end].decode("utf-8")] = (wire[key_end:after], value)
        pos = after
    return entries


def same_value(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` are the same field value: equal, of the same Python
    types throughout (``1 == 1.0 == True`` is not enough), floats bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, float):
        return Struct.double.pack(a) == Struct.double.pack(b)
    if isinstance(a, decimal.Decimal):
        assert isinstance(b, decimal.Decimal)
        return a.as_tuple() == b.as_tuple()
    return bool(a == b)


def encode_table(table: Mapping[str, Any]) -> bytes:
    """A field table, its 4-byte length first.

    The entries of a :class:`Headers` whose values are still those received are
    written as they were received; every other value is encoded by
    :func:`encode_value`. A plain dict's entries are written in sorted order (as
    pamqp does), a :class:`Headers`' in its own order.

    Raises:
        ValueError: a value cannot be encoded, or a name is longer than 255 bytes
            (the message names the header).
    """
    received: dict[str, tuple[bytes, Any]] = {}
    if isinstance(table, Headers) and table.wire:
        if len(table) == 0:
            return Struct.integer.pack(0)
        received = _received_entries(table.wire)
        items = list(table.items())
    else:
        items = sorted(table.items())
    parts = []
    for key, value in items:
        name = key.encode("utf-8") if isinstance(key, str) else key
        if not isinstance(name, bytes) or len(name) > 255:
            raise ValueError(f"a header name must be a str of at most 255 bytes, not {key!r}")
        parts.append(Struct.byte.pack(len(name)) + name)
        entry = received.get(key)
        if entry is not None and same_value(value, entry[1]):
            parts.append(entry[0])
            continue
        try:
            parts.append(encode_value(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"header {key!r}: {exc}") from exc
    data = b"".join(parts)
    return Struct.integer.pack(len(data)) + data


def encode_properties(properties: commands.Basic.Properties) -> bytes:
    """The property flags and values of a content header (headers by
    :func:`encode_table`, the timestamp in seconds, the rest as pamqp encodes them).

    Raises:
        ValueError: a value cannot be encoded.
    """
    flags = 0
    parts: list[bytes] = []
    for name, flag, kind in _PROPERTIES:
        value = getattr(properties, name)
        if value is None or value == "":
            continue
        flags |= flag
        if kind == "table":
            parts.append(encode_table(value))
        elif kind == "timestamp":
            parts.append(_TIMESTAMP.pack(_timestamp_seconds(value)))
        elif kind == "octet":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise ValueError(f"the {name} property must be an int from 0 to 255, not {value!r}")
            parts.append(Struct.byte.pack(value))
        else:
            try:
                parts.append(pamqp_encode.short_string(value))
            except TypeError as exc:
                raise ValueError(f"the {name} property cannot be encoded: {exc}") from exc
    return _FLAGS.pack(flags) + b"".join(parts)


class _EncodedContentHeader(header.ContentHeader):
    """pamqp's ContentHeader with properties encoded here (for ``pamqp.frame.marshal``)."""

    def __init__(self, body_size: int, properties: bytes) -> None:
        super().__init__(0, body_size)
        self._encoded = properties

    def marshal(self) -> bytes:
        return _CONTENT_PREFIX.pack(commands.Basic.frame_id, 0, self.body_size) + self._encoded


def content_header(
    body_size: int, properties: commands.Basic.Properties | None
) -> header.ContentHeader:
    """The content header of a message, for ``pamqp.frame.marshal``.

    Raises:
        ValueError: the properties cannot be encoded.
    """
    encoded = b"\x00\x00" if properties is None else encode_properties(properties)
    return _EncodedContentHeader(body_size, encoded)
