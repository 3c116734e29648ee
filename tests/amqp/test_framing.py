"""The framing module on its own: the first-bytes check, the decoders, body frames."""

from __future__ import annotations

import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from strictconsume.amqp._errors import RemoteProtocolError
from strictconsume.amqp._framing import (
    FRAME_OVERHEAD,
    METHOD_INDEX,
    PROTOCOL_HEADER,
    body_frames,
    check_first_bytes,
    decode,
    decode_header,
    decode_method,
)


def payload(frame: bytes) -> bytes:
    """A frame without its 7 header bytes and its frame-end octet."""
    return frame[7:-1]


def test_the_protocol_header_is_amqp_0_9_1() -> None:
    assert PROTOCOL_HEADER == b"AMQP\x00\x00\x09\x01"


@pytest.mark.parametrize("cut", [1, 3, 6])
def test_a_method_frame_header_cut_short_needs_more_bytes(cut: int) -> None:
    start = pamqp.frame.marshal(commands.Connection.Start(), 0)
    assert check_first_bytes(start[:cut]) is False
    assert check_first_bytes(start[:7]) is True
    assert check_first_bytes(start) is True


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_a_protocol_header_cut_short_needs_more_bytes(cut: int) -> None:
    assert check_first_bytes(b"AMQP\x00\x00\x08\x00"[:cut]) is False


def test_the_brokers_own_protocol_header_names_its_version() -> None:
    with pytest.raises(RemoteProtocolError, match="offered protocol version 0-8-0"):
        check_first_bytes(b"AMQP\x00\x00\x08\x00")


@pytest.mark.parametrize("data", [b"HTTP/1.1 400 Bad Request\r\n", b"\x01\x00\x01\x00\x00\x00\x0c"])
def test_bytes_that_are_not_amqp_are_refused_with_what_was_sent(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="does not speak AMQP 0-9-1") as info:
        check_first_bytes(data)
    assert repr(data[:32]) in str(info.value)


def test_the_fast_method_decoder_agrees_with_pamqp() -> None:
    deliver = commands.Basic.Deliver("ctag", 7, True, "ex", "rk")
    method = decode_method(payload(pamqp.frame.marshal(deliver, 1)))
    assert isinstance(method, commands.Basic.Deliver)
    assert dict(method) == dict(deliver)


short_str = st.text(max_size=80).filter(lambda text: len(text.encode()) <= 255)


@given(
    consumer_tag=short_str,
    delivery_tag=st.integers(0, 2**63 - 1),  # pamqp reads a longlong as signed
    redelivered=st.booleans(),
    exchange=short_str,  # any name the broker allows, not only pamqp's pattern
    routing_key=short_str,
)
def test_basic_deliver_decodes_as_pamqps_own_unmarshal(
    consumer_tag: str, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str
) -> None:
    # Encoded field by field: pamqp's marshal() would refuse such exchange names.
    data = b"".join(
        (
            METHOD_INDEX.pack(commands.Basic.Deliver.index),
            encode.short_string(consumer_tag),
            encode.long_long_int(delivery_tag),
            encode.octet(int(redelivered)),
            encode.short_string(exchange),
            encode.short_string(routing_key),
        )
    )
    generic = commands.Basic.Deliver()
    generic.unmarshal(data[4:])
    decoded = decode_method(data)
    assert type(decoded) is commands.Basic.Deliver
    assert dict(decoded) == dict(generic)
    assert dict(decoded) == {
        "consumer_tag": consumer_tag,
        "delivery_tag": delivery_tag,
        "redelivered": redelivered,
        "exchange": exchange,
        "routing_key": routing_key,
    }


@given(
    consumer_tag=short_str,
    delivery_tag=st.integers(-(2**63), 2**63 - 1),
    bits=st.integers(0, 255),
    exchange=short_str,
    routing_key=short_str,
    cut=st.integers(4, 800),
)
def test_basic_deliver_cut_anywhere_decodes_or_fails_as_pamqps_unmarshal(
    consumer_tag: str, delivery_tag: int, bits: int, exchange: str, routing_key: str, cut: int
) -> None:
    data = b"".join(
        (
            METHOD_INDEX.pack(commands.Basic.Deliver.index),
            encode.short_string(consumer_tag),
            encode.long_long_int(delivery_tag),
            encode.octet(bits),
            encode.short_string(exchange),
            encode.short_string(routing_key),
        )
    )[:cut]
    generic = commands.Basic.Deliver()
    try:
        generic.unmarshal(data[4:])
    except Exception:
        with pytest.raises(RemoteProtocolError, match="cannot be decoded"):
            decode_method(data)
        return
    assert dict(decode_method(data)) == dict(generic)


@pytest.mark.parametrize("cut", [4, 5, 10, 17])
def test_a_basic_deliver_cut_short_is_the_brokers_error(cut: int) -> None:
    deliver = commands.Basic.Deliver("ctag", 7, True, "ex", "rk")
    data = payload(pamqp.frame.marshal(deliver, 1))
    with pytest.raises(RemoteProtocolError, match="cannot be decoded"):
        decode_method(data[:cut])


def test_the_fast_header_decoder_agrees_with_pamqp() -> None:
    properties = commands.Basic.Properties(content_type="application/json", priority=3)
    frame = pamqp.frame.marshal(ContentHeader(0, 1234, properties), 1)
    class_id, body_size, decoded = decode_header(payload(frame))
    assert (class_id, body_size) == (60, 1234)
    assert decoded.content_type == "application/json"
    assert decoded.priority == 3


@pytest.mark.parametrize(
    "call", [lambda: decode_method(b"\x00\x3c\x00\x63"), lambda: decode(b"\x01\x00")]
)
def test_what_cannot_be_decoded_is_the_brokers_error(call: object) -> None:
    assert callable(call)
    with pytest.raises(RemoteProtocolError, match="cannot be decoded"):
        call()


@pytest.mark.parametrize(
    ("size", "frame_max", "count"),
    [(0, 4096, 0), (1, 4096, 1), (4088, 4096, 1), (4089, 4096, 2), (3 * 4088, 4096, 3)],
)
def test_a_body_is_split_into_frames_of_at_most_frame_max(
    size: int, frame_max: int, count: int
) -> None:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frames = body_frames(body, 5, frame_max)
    assert len(frames) == count
    assert all(len(frame) <= frame_max for frame in frames)
    assert sum(len(frame) - FRAME_OVERHEAD for frame in frames) == size
    joined = b""
    for frame in frames:
        _, channel, value = pamqp.frame.unmarshal(frame)
        assert channel == 5
        assert isinstance(value, ContentBody)
        joined += value.value
    assert joined == body
