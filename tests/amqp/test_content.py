"""Content assembly on one channel, without a connection around it."""

from __future__ import annotations

import attrs
import pamqp.frame
import pytest
from pamqp import commands
from pamqp.header import ContentHeader

from strictconsume.amqp._content import ContentAssembly
from strictconsume.amqp._errors import RemoteProtocolError
from strictconsume.amqp._events import Delivery, GetResult, Returned

Props = commands.Basic.Properties


def header(body_size: int, properties: Props | None = None) -> bytes:
    return pamqp.frame.marshal(ContentHeader(0, body_size, properties), 1)[7:-1]


def no_return(exchange: str, routing_key: str, body: bytes) -> int | None:
    raise AssertionError("only a returned message is matched")


def test_a_delivery_in_three_body_frames_is_one_event() -> None:
    content = ContentAssembly()
    content.content_method = commands.Basic.Deliver("ctag", 9, False, "ex", "rk")
    assert content.content_header(1, header(6, Props(message_id="m1"))) is False
    assert content.content_body(1, b"ab") is None
    assert content.content_body(1, b"cd") is None
    body = content.content_body(1, b"ef")
    assert body == b"abcdef"
    event = content.content_complete(1, body, no_return)
    assert event == Delivery(1, "ctag", 9, False, "ex", "rk", Props(message_id="m1"), b"abcdef")
    assert attrs.asdict(content) == attrs.asdict(ContentAssembly())  # ready for the next


def test_an_empty_body_completes_with_the_header() -> None:
    content = ContentAssembly()
    content.content_method = commands.Basic.GetOk(4, True, "", "q", 2)
    assert content.content_header(1, header(0)) is True
    assert content.content_complete(1, b"", no_return) == GetResult(
        1, 4, True, "", "q", 2, Props(), b""
    )


def test_a_returned_message_takes_the_publish_tag_it_is_matched_to() -> None:
    content = ContentAssembly()
    content.content_method = commands.Basic.Return(312, "NO_ROUTE", "ex", "rk")
    assert content.content_header(1, header(1)) is False
    seen: list[tuple[str, str, bytes]] = []

    def match(exchange: str, routing_key: str, body: bytes) -> int | None:
        seen.append((exchange, routing_key, body))
        return 17

    body = content.content_body(1, b"x")
    assert body is not None
    assert content.content_complete(1, body, match) == Returned(
        1, 17, 312, "NO_ROUTE", "ex", "rk", Props(), b"x"
    )
    assert seen == [("ex", "rk", b"x")]


def test_a_header_without_a_method_is_the_brokers_error() -> None:
    with pytest.raises(RemoteProtocolError, match="content header on channel 2 without"):
        ContentAssembly().content_header(2, header(1))


def test_a_second_header_is_the_brokers_error() -> None:
    content = ContentAssembly()
    content.content_method = commands.Basic.Deliver("c", 1, False, "", "q")
    content.content_header(2, header(5))
    with pytest.raises(RemoteProtocolError, match="second content header on channel 2"):
        content.content_header(2, header(5))


def test_a_body_without_a_header_or_longer_than_announced_is_the_brokers_error() -> None:
    content = ContentAssembly()
    with pytest.raises(RemoteProtocolError, match="body frame on channel 3 without a content"):
        content.content_body(3, b"x")
    content.content_method = commands.Basic.Deliver("c", 1, False, "", "q")
    content.content_header(3, header(2))
    assert content.content_body(3, b"a") is None
    with pytest.raises(RemoteProtocolError, match="more body bytes on channel 3 than the 2"):
        content.content_body(3, b"bc")


def test_undecodable_properties_of_a_delivery_travel_with_the_reason() -> None:
    content = ContentAssembly()
    content.content_method = commands.Basic.Deliver("c", 1, False, "", "q")
    # property flags: message_id (bit 7 of the first byte... 0x0080) with a short
    # string that is not UTF-8
    raw = b"\x00\x3c\x00\x00" + (1).to_bytes(8, "big") + b"\x00\x80" + b"\x02\xff\xfe"
    assert content.content_header(1, raw) is False
    body = content.content_body(1, b"z")
    assert body is not None
    event = content.content_complete(1, body, no_return)
    assert isinstance(event, Delivery)
    assert event.properties == Props()
    assert event.properties_error is not None
    assert event.properties_error.startswith("its properties cannot be decoded")


def test_undecodable_properties_of_a_get_ok_are_the_brokers_error() -> None:
    content = ContentAssembly()
    content.content_method = commands.Basic.GetOk(1, False, "", "q", 0)
    raw = b"\x00\x3c\x00\x00" + (1).to_bytes(8, "big") + b"\x00\x80" + b"\x02\xff\xfe"
    with pytest.raises(RemoteProtocolError, match="cannot be decoded"):
        content.content_header(1, raw)


def test_reset_forgets_content_half_assembled() -> None:
    content = ContentAssembly()
    content.content_method = commands.Basic.Deliver("c", 1, False, "", "q")
    content.content_header(1, header(4))
    content.content_body(1, b"ab")
    content.reset_content()
    assert attrs.asdict(content) == attrs.asdict(ContentAssembly())
