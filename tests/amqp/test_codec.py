"""The header and property codec (``amqp._codec``): exact bytes in and out, no sockets.

What other clients send must decode to the values they meant, what we publish must use
only the field types amqp091-go, the Java client and amqplib read, and a copy of a
received table must carry every untouched entry byte for byte.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import frame, header

from strictconsume._dispatch import _copy_properties, copy_headers
from strictconsume.amqp import Headers, Properties, Timestamp, _codec
from strictconsume.amqp._codec import (
    content_header,
    decode_content_header,
    decode_properties,
    decode_table,
    encode_properties,
    encode_table,
    encode_value,
)

UTC = datetime.UTC


def table(*entries: tuple[str, bytes]) -> bytes:
    """An encoded field table of (name, tagged value) entries, in that order."""
    data = b"".join(bytes([len(k.encode())]) + k.encode() + v for k, v in entries)
    return struct.pack(">I", len(data)) + data


def decoded(value: bytes) -> Any:
    """The Python value of one tagged field value, decoded as a header."""
    headers, end = decode_table(table(("k", value)))
    assert end == len(value) + 6
    return headers["k"]


def q(n: int) -> bytes:
    return struct.pack(">q", n)


# -- decoding: what other clients send --------------------------------------------------

RECEIVED: list[tuple[bytes, Any]] = [
    (b"t\x01", True),
    (b"t\x00", False),
    (b"b\x80", -128),
    (b"b\x7f", 127),
    (b"B\xff", 255),  # amqp091-go byte, amqplib uint8
    (b"s\x80\x00", -32768),
    (b"s\x7f\xff", 32767),
    (b"u\xff\xff", 65535),  # amqplib uint16, pamqp
    (b"I\x80\x00\x00\x00", -(2**31)),
    (b"I\x00\x00\x03\xe8", 1000),  # a Java Integer 1000
    (b"I\x7f\xff\xff\xff", 2**31 - 1),
    (b"i\xff\xff\xff\xff", 2**32 - 1),  # amqplib uint32, pamqp
    (b"l" + q(-(2**63)), -(2**63)),
    (b"l" + q(5), 5),  # a Java Long 5
    (b"l" + q(2**63 - 1), 2**63 - 1),
    (b"f" + struct.pack(">f", 1.5), 1.5),
    (b"d" + struct.pack(">d", 0.1), 0.1),
    (b"d" + struct.pack(">d", 1.7976931348623157e308), 1.7976931348623157e308),
    (b"D\x02" + struct.pack(">i", -12345), decimal.Decimal("-123.45")),
    (b"D\x00" + struct.pack(">i", 2**31 - 1), decimal.Decimal(2**31 - 1)),
    (b"S\x00\x00\x00\x06h\xc3\xa9llo", "héllo"),
    (b"S\x00\x00\x00\x00", ""),
    (b"S\x00\x00\x00\x02\xff\xfe", b"\xff\xfe"),  # not UTF-8 (Go strings may be anything)
    (b"x\x00\x00\x00\x03\x00\x01\xff", bytearray(b"\x00\x01\xff")),
    (b"V", None),
    (b"\x00", None),
    (b"A\x00\x00\x00\x04b\x01t\x01", [1, True]),
    (b"A\x00\x00\x00\x00", []),
    (b"F" + table(("n", b"F" + table(("a", b"A\x00\x00\x00\x02b\x07")))), {"n": {"a": [7]}}),
]


@pytest.mark.parametrize(("wire", "value"), RECEIVED, ids=[repr(w[:12]) for w, _ in RECEIVED])
def test_each_field_type_decodes_to_its_value(wire: bytes, value: Any) -> None:
    got = decoded(wire)
    assert type(got) is type(value)
    assert got == value


TIMESTAMPS = [
    (0, datetime.datetime(1970, 1, 1, tzinfo=UTC)),
    (2**32 - 1, datetime.datetime(2106, 2, 7, 6, 28, 15, tzinfo=UTC)),
    # pamqp reads anything above 2**32 as milliseconds: 1970-02-19 and 1970-03-26
    (2**32, datetime.datetime(2106, 2, 7, 6, 28, 16, tzinfo=UTC)),
    (7258118400, datetime.datetime(2200, 1, 1, tzinfo=UTC)),
    (253402300799, datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    (-1, datetime.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)),
    (-62135596800, datetime.datetime(1, 1, 1, tzinfo=UTC)),
    (253402300800, Timestamp(253402300800)),  # year 10000
    (-62135596801, Timestamp(-62135596801)),
    (2**63 - 1, Timestamp(2**63 - 1)),
    (-(2**63), Timestamp(-(2**63))),
]


@pytest.mark.parametrize(("seconds", "value"), TIMESTAMPS, ids=[str(s) for s, _ in TIMESTAMPS])
def test_timestamps_are_seconds_whatever_their_size(seconds: int, value: object) -> None:
    assert decoded(b"T" + q(seconds)) == value
    assert encode_value(value) == b"T" + q(seconds)
    properties = decode_properties(b"\x00\x40" + q(seconds))
    assert properties.timestamp == value
    assert encode_properties(properties) == b"\x00\x40" + q(seconds)


def test_a_timestamp_value_is_validated() -> None:
    with pytest.raises(ValueError, match="64 signed bits"):
        Timestamp(2**63)
    with pytest.raises(TypeError, match="must be an int"):
        Timestamp(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "wire",
    [
        table(("k", b"Z\x00")),  # unknown field type
        table(("k", b"S\x00\x00\x00\x09ab")),  # a string past the end
        table(("k", b"I\x00\x00")),  # truncated int
        table((b"\xff".decode("latin-1"), b"V"))[:-2] + b"\xff" + b"V",  # name not UTF-8
        b"\x00\x00\x00\x05\x01kb\x01\x00",  # entries shorter than the length
    ],
)
def test_malformed_tables_are_a_value_error(wire: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each has its own message)
        decode_table(wire)


def test_a_table_keeps_its_received_bytes() -> None:
    wire = table(("b", b"b\x01"), ("a", b"l" + q(5)))
    headers, end = decode_table(b"junk" + wire + b"tail", 4)
    assert end == 4 + len(wire)
    assert isinstance(headers, Headers)
    assert headers == {"b": 1, "a": 5}
    assert headers.wire == wire
    assert headers.copy().wire == wire
    assert encode_table(headers) == wire  # in its own order, each entry as it came


# -- encoding: what we publish ----------------------------------------------------------

PUBLISHED: list[tuple[Any, bytes]] = [
    (True, b"t\x01"),
    (False, b"t\x00"),
    (-128, b"b\x80"),
    (127, b"b\x7f"),
    (128, b"s\x00\x80"),
    (-129, b"s\xff\x7f"),
    (32767, b"s\x7f\xff"),
    (-32768, b"s\x80\x00"),
    (32768, b"I\x00\x00\x80\x00"),  # pamqp: 'u'
    (65535, b"I\x00\x00\xff\xff"),  # pamqp: 'u'
    (-32769, b"I\xff\xff\x7f\xff"),
    (2**31 - 1, b"I\x7f\xff\xff\xff"),
    (-(2**31), b"I\x80\x00\x00\x00"),
    (2**31, b"l" + q(2**31)),  # pamqp: 'i'
    (2**32 - 1, b"l" + q(2**32 - 1)),  # pamqp: 'i'
    (2**32, b"l" + q(2**32)),
    (-(2**31) - 1, b"l" + q(-(2**31) - 1)),
    (2**63 - 1, b"l" + q(2**63 - 1)),
    (-(2**63), b"l" + q(-(2**63))),
    (0.1, b"d" + struct.pack(">d", 0.1)),  # pamqp: 'f', 0.10000000149011612
    (1e300, b"d" + struct.pack(">d", 1e300)),
    (-0.0, b"d" + struct.pack(">d", -0.0)),
    (decimal.Decimal("-123.45"), b"D\x02" + struct.pack(">i", -12345)),
    (decimal.Decimal("1E+3"), b"D\x00" + struct.pack(">i", 1000)),
    ("héllo", b"S\x00\x00\x00\x06h\xc3\xa9llo"),
    ("", b"S\x00\x00\x00\x00"),
    (b"\x00\xff", b"x\x00\x00\x00\x02\x00\xff"),
    (bytearray(b"\x00\xff"), b"x\x00\x00\x00\x02\x00\xff"),
    (None, b"V"),
    (datetime.datetime(2200, 1, 1, tzinfo=UTC), b"T" + q(7258118400)),
    (datetime.datetime(2200, 1, 1), b"T" + q(7258118400)),  # naive: UTC
    (datetime.datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), b"T" + q(-1)),
    (
        datetime.datetime(2024, 1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
        b"T" + q(1704067200),
    ),
    (Timestamp(2**63 - 1), b"T" + q(2**63 - 1)),
    ([1, "a", [None]], b"A\x00\x00\x00\x0eb\x01S\x00\x00\x00\x01aA\x00\x00\x00\x01V"),
    ((1,), b"A\x00\x00\x00\x02b\x01"),
    ({"z": 1, "a": {}}, b"F" + table(("a", b"F\x00\x00\x00\x00"), ("z", b"b\x01"))),
]


@pytest.mark.parametrize(
    ("value", "wire"), PUBLISHED, ids=[f"{type(v).__name__}:{v!r}"[:40] for v, _ in PUBLISHED]
)
def test_python_values_get_a_type_every_client_reads(value: Any, wire: bytes) -> None:
    assert encode_value(value) == wire
    assert wire[:1] in b"tbsIldDSxTFAV"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2**63, "beyond the 64 signed bits"),
        (-(2**63) - 1, "beyond the 64 signed bits"),
        (decimal.Decimal("1E-300"), "cannot be encoded"),
        (decimal.Decimal(2**31), "cannot be encoded"),
        (decimal.Decimal("NaN"), "cannot be encoded"),
        (float("inf"), "RabbitMQ cannot carry"),
        (float("nan"), "RabbitMQ cannot carry"),
    ],
)
def test_values_beyond_amqp_are_a_value_error(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_value(value)
    with pytest.raises(ValueError, match=f"header 'big': .*{message}"):
        encode_table({"big": value})


def test_a_value_of_no_amqp_type_is_named() -> None:
    with pytest.raises(TypeError, match="no field type for object"):
        encode_value(object())
    with pytest.raises(ValueError, match="header 'o': AMQP has no field type"):
        encode_table({"o": object()})
    with pytest.raises(ValueError, match="at most 255 bytes"):
        encode_table({"k" * 256: 1})


def test_everything_published_decodes_to_what_was_sent() -> None:
    values: dict[str, Any] = {f"k{i}": v for i, (v, _) in enumerate(PUBLISHED)}
    headers, _ = decode_table(encode_table(values))
    for key, value in values.items():
        expected: Any = value
        if isinstance(value, bytes):
            expected = bytearray(value)
        elif isinstance(value, tuple):
            expected = list(value)
        elif isinstance(value, datetime.datetime):
            expected = datetime.datetime.fromtimestamp(value.timestamp() // 1, UTC)
        assert headers[key] == expected, key


# -- properties ------------------------------------------------------------------------


def test_every_property_round_trips_byte_for_byte() -> None:
    properties = Properties(
        content_type="application/json",
        content_encoding="gzip",
        headers={"a": 1},
        delivery_mode=2,
        priority=9,
        correlation_id="c",
        reply_to="r",
        expiration="60000",
        message_id="m",
        timestamp=datetime.datetime(2200, 1, 1, tzinfo=UTC),
        message_type="t",
        user_id="guest",
        app_id="app",
    )
    properties.cluster_id = "cl"
    data = encode_properties(properties)
    assert data == (
        b"\xff\xfc"
        b"\x10application/json\x04gzip"
        + table(("a", b"b\x01"))
        + b"\x02\x09\x01c\x01r\x0560000\x01m"
        + q(7258118400)
        + b"\x01t\x05guest\x03app\x02cl"
    )
    decoded_properties = decode_properties(data)
    for name in Properties.attributes():
        assert getattr(decoded_properties, name) == getattr(properties, name), name
    assert encode_properties(decoded_properties) == data


def test_a_content_header_frame_is_what_pamqp_would_marshal_for_plain_values() -> None:
    properties = Properties(message_id="m", headers={"n": 7, "s": "x"}, delivery_mode=2)
    ours = frame.marshal(content_header(10, properties), 3)
    pamqps = frame.marshal(header.ContentHeader(0, 10, properties), 3)
    assert ours == pamqps
    class_id, size, back = decode_content_header(ours[7:-1])
    assert (class_id, size) == (60, 10)
    assert back == properties
    assert frame.marshal(content_header(0, None), 1) == frame.marshal(header.ContentHeader(), 1)


# Plain values of each property, as pamqp's own ContentHeader.unmarshal decodes them
# (timestamps aside: pamqp reads large ones as milliseconds, see the module notes).
PLAIN_VALUES: dict[str, Any] = {
    "content_type": "application/json",
    "content_encoding": "gzip",
    "headers": {"a": 1, "s": "x"},
    "delivery_mode": 2,
    "priority": 9,
    "correlation_id": "c",
    "reply_to": "r",
    "expiration": "60000",
    "message_id": "m",
    "message_type": "t",
    "user_id": "guest",
    "app_id": "app",
    "cluster_id": "cl",
}


@given(st.sets(st.sampled_from(sorted(PLAIN_VALUES))))
def test_any_set_of_properties_decodes_as_pamqp_unmarshals_it(names: set[str]) -> None:
    properties = Properties()
    for name in names:
        setattr(properties, name, PLAIN_VALUES[name])
    wire = header.ContentHeader(0, 5, properties).marshal()
    pamqps = header.ContentHeader()
    pamqps.unmarshal(wire)
    class_id, size, ours = decode_content_header(wire)
    assert (class_id, size) == (60, 5)
    assert type(ours) is Properties
    for name in Properties.attributes():
        assert getattr(ours, name) == getattr(pamqps.properties, name), name
        if name != "headers":  # a Headers, the dict that remembers its bytes
            assert type(getattr(ours, name)) is type(getattr(pamqps.properties, name)), name
    assert isinstance(ours.headers, Headers) == ("headers" in names)


def test_decoded_properties_are_taken_as_they_come_as_pamqp_does() -> None:
    # pamqp's Properties(...) would refuse both (validate()); its unmarshal does not,
    # and neither do we: what the broker delivered reaches the handler as it is.
    with pytest.raises(ValueError, match="delivery_mode"):
        Properties(delivery_mode=3)
    decoded_properties = decode_properties(b"\x10\x04\x03\x02cl")
    assert decoded_properties.delivery_mode == 3
    assert decoded_properties.cluster_id == "cl"
    empty = decode_properties(b"\x00\x00")
    assert empty == Properties()
    assert empty.cluster_id == ""


def test_the_plan_cache_is_bounded_and_decoding_goes_on_past_it() -> None:
    # 2**13 sets of the 13 properties with plain values, more than the cache holds:
    # every one still decodes right once the cache is full.
    names = sorted(PLAIN_VALUES)
    seen = 0
    for mask in range(0, 2 ** len(names), 7):
        properties = Properties()
        chosen = [name for bit, name in enumerate(names) if mask >> bit & 1]
        for name in chosen:
            setattr(properties, name, PLAIN_VALUES[name])
        back = decode_properties(encode_properties(properties))
        for name in Properties.attributes():
            assert getattr(back, name) == getattr(properties, name), (mask, name)
        seen += 1
    assert seen > _codec._PLANS_MAX
    assert len(_codec._PLANS) == _codec._PLANS_MAX


def test_the_plan_cache_keeps_only_property_bits_of_headers_that_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_codec, "_PLANS", {})
    # message_id that is not UTF-8: no plan kept for a header that failed
    with pytest.raises(ValueError, match="not UTF-8"):
        decode_properties(b"\x00\x80\x02\xff\xfe")
    assert _codec._PLANS == {}
    # delivery_mode, with the continuation bit and the reserved bit set and two more
    # flag words (which name no property): one key, the property bits alone
    back = decode_properties(b"\x10\x03" + b"\xff\xff" + b"\x00\x00" + b"\x02")
    assert back.delivery_mode == 2
    assert back == decode_properties(b"\x10\x00\x02")
    assert list(_codec._PLANS) == [0x1000]


def test_properties_that_are_not_utf8_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        decode_properties(b"\x00\x80\x02\xff\xfe")  # message_id
    with pytest.raises(ValueError, match="truncated"):
        decode_properties(b"\x00\x40\x00\x00")  # a timestamp of 2 bytes
    with pytest.raises(ValueError, match="priority property must be an int"):
        encode_properties(Properties(priority=256))


# -- copies -----------------------------------------------------------------------------

# A Java publisher's table: Integer 1000, Long 5, a float, an unsigned short (amqplib),
# a string that is not UTF-8 (Go), a nested table with a short and a timestamp.
JAVA_TABLE = table(
    ("int", b"I\x00\x00\x03\xe8"),
    ("long", b"l" + q(5)),
    ("single", b"f" + struct.pack(">f", 0.1)),
    ("ushort", b"u\x00\x07"),
    ("latin", b"S\x00\x00\x00\x02\xe9t"),
    ("nested", b"F" + table(("s", b"s\x00\x01"), ("when", b"T" + q(2**63 - 1)))),
    ("x-attempt", b"I\x00\x00\x00\x01"),
    ("x-delivery-count", b"l" + q(3)),
)


def test_a_copy_keeps_every_untouched_entry_byte_for_byte() -> None:
    original, _ = decode_table(JAVA_TABLE)
    copy = copy_headers(original, {"x-attempt": 2, "x-error-type": "ValueError"})
    assert isinstance(copy, Headers)
    assert encode_table(copy) == table(
        ("int", b"I\x00\x00\x03\xe8"),
        ("long", b"l" + q(5)),
        ("single", b"f" + struct.pack(">f", 0.1)),
        ("ushort", b"u\x00\x07"),
        ("latin", b"S\x00\x00\x00\x02\xe9t"),
        ("nested", b"F" + table(("s", b"s\x00\x01"), ("when", b"T" + q(2**63 - 1)))),
        ("x-attempt", b"b\x02"),  # ours: the smallest signed type
        ("x-error-type", b"S\x00\x00\x00\x0aValueError"),
    )
    assert encode_table(original) == JAVA_TABLE  # the original is left alone


def test_a_copy_encodes_what_the_handler_changed() -> None:
    original, _ = decode_table(JAVA_TABLE)
    nested = original["nested"]
    assert isinstance(nested, dict)
    nested["s"] = 2  # changed inside: the whole entry is encoded again
    original["long"] = 5  # the same value and type: kept as it came
    original["int"] = 1000.0  # equal, but another type: encoded again
    del original["latin"]
    data = encode_table(original)
    again, _ = decode_table(data)
    assert again["nested"] == {"s": 2, "when": Timestamp(2**63 - 1)}
    assert b"\x04longl" + q(5) in data
    assert b"\x03intd" in data
    assert "latin" not in again


def test_copy_properties_keep_the_timestamp_and_every_property() -> None:
    wire = (
        b"\xff\xfc\x04text\x04gzip"
        + JAVA_TABLE
        + b"\x01\x05\x01c\x01r\x011\x01m"
        + q(2**63 - 1)
        + b"\x01t\x05guest\x03app\x02cl"
    )
    original = decode_properties(wire)
    assert original.timestamp == Timestamp(2**63 - 1)
    copy = _copy_properties(original, {"x-attempt": 2})
    data = encode_properties(copy)
    back = decode_properties(data)
    assert back.delivery_mode == 2  # copies are persistent
    assert back.expiration is None  # and never expire (as the broker's dead-lettering)
    for name in ("content_type", "content_encoding", "priority", "correlation_id",
                 "reply_to", "message_id", "timestamp", "message_type", "user_id",
                 "app_id", "cluster_id"):  # fmt: skip
        assert getattr(back, name) == getattr(original, name), name
    assert isinstance(back.headers, Headers)
    assert b"\x03intI\x00\x00\x03\xe8" in back.headers.wire
    assert b"\x04longl" + q(5) in back.headers.wire
