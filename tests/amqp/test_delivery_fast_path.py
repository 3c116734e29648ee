"""The frame loop's fast path for a whole delivery (``_receive._whole_delivery``).

basic.deliver, its content header and one body frame, all complete in one read on an
open channel, become a ``Delivery`` at once; every other shape goes frame by frame
through the general path. The two must agree on every byte stream: the same events,
and the same error with the same message. Fed whole, a stream takes the fast path
wherever it can (counted, so that the comparison is not vacuous); fed one byte at a
time, or with the fast path switched off, it takes the general path only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from strictconsume.amqp import _receive
from strictconsume.amqp._errors import RemoteProtocolError
from strictconsume.amqp._protocol import Delivery, Event, ProtocolConnection
from tests.amqp.test_protocol import Props, connect, norm, open_channel, server, server_content

FRAME_MAX = 4096
Deliver = commands.Basic.Deliver
RICH = Props(
    content_type="application/json",
    headers={"n": 1, "s": "x", "nested": {"a": [1, "b"]}},
    delivery_mode=2,
    message_id="m",
    priority=3,
)


def ready() -> ProtocolConnection:
    """A connection (frame_max 4096) with channels 1 and 2 open."""
    conn = connect(tune=(2047, FRAME_MAX, 60))
    assert open_channel(conn) == 1
    assert open_channel(conn) == 2
    return conn


@contextmanager
def fast_path_counted() -> Iterator[list[int]]:
    """Count the deliveries the fast path took (the offsets it returned, 0 = declined)."""
    taken: list[int] = []
    original = _receive._whole_delivery

    def counting(*args: object) -> int:
        after = original(*args)  # type: ignore[arg-type]
        taken.append(after)
        return after

    _receive._whole_delivery = counting  # type: ignore[assignment]
    try:
        yield taken
    finally:
        _receive._whole_delivery = original


@contextmanager
def fast_path_off() -> Iterator[None]:
    original = _receive._whole_delivery
    _receive._whole_delivery = lambda *args: 0
    try:
        yield
    finally:
        _receive._whole_delivery = original


def feed(conn: ProtocolConnection, pieces: list[bytes]) -> tuple[list[object], str | None]:
    """Events of feeding ``pieces`` in turn, and the protocol error's message if any."""
    events: list[Event] = []
    for piece in pieces:
        try:
            events.extend(conn.receive_data(piece))
        except RemoteProtocolError as exc:
            return norm(events), str(exc)
    return norm(events), None


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def undecodable_header(channel: int, body_size: int) -> bytes:
    """A content header whose message_id is not UTF-8 (any client may publish one)."""
    payload = struct.pack(">HHQH", 60, 0, body_size, 1 << 7) + b"\x02\xff\xfe"
    return b"\x02" + struct.pack(">HI", channel, len(payload)) + payload + b"\xce"


def deliver(channel: int, tag: int, body: bytes, props: Props | None = None) -> bytes:
    return server_content(channel, Deliver("ctag", tag, tag % 2 == 0, "ex", "rk"), body, props,
                          frame_max=FRAME_MAX)  # fmt: skip


# The pieces a stream is made of: each a few whole frames, of every shape.
SHAPES: dict[str, Callable[[int], bytes]] = {
    "plain": lambda tag: deliver(1, tag, b"x" * 128, Props(delivery_mode=2)),
    "rich": lambda tag: deliver(2, tag, b'{"a": 1}', RICH),
    "no properties": lambda tag: deliver(1, tag, b"body"),
    "empty body": lambda tag: deliver(2, tag, b"", Props(message_id="e")),
    "one full frame": lambda tag: deliver(1, tag, b"f" * (FRAME_MAX - 8)),
    "three frames": lambda tag: deliver(1, tag, bytes(range(256)) * 40, RICH),
    "heartbeat": lambda tag: server(0, Heartbeat()),
    "return": lambda tag: server_content(
        2, commands.Basic.Return(312, "NO_ROUTE", "", "nowhere"), b"back", Props(message_id="r")
    ),
    "undecodable properties": lambda tag: (
        server(1, Deliver("ctag", tag, False, "", "q"))
        + undecodable_header(1, 3)
        + server(1, ContentBody(b"bad"))
    ),
    "interleaved": lambda tag: (
        server(1, Deliver("ctag", tag, False, "", "q"))
        + server(1, ContentHeader(0, 2, Props(app_id="i")))
        + server_content(2, Deliver("ctag2", tag, False, "", "q2"), b"two")
        + server(1, ContentBody(b"on"))
    ),
}


def stream(names: list[str]) -> bytes:
    return b"".join(SHAPES[name](tag) for tag, name in enumerate(names, 1))


def test_every_shape_gives_the_same_events_on_both_paths() -> None:
    data = stream(list(SHAPES))
    with fast_path_counted() as taken:
        whole = feed(ready(), [data])
    with fast_path_off():
        general = feed(ready(), [data])
    by_bytes = feed(ready(), bytewise(data))
    assert whole == general == by_bytes
    assert whole[1] is None
    deliveries = [e for e in whole[0] if isinstance(e, Delivery)]
    assert len(deliveries) == 9  # "interleaved" delivers two
    # plain, rich, no properties, empty body, one full frame and the whole delivery on
    # channel 2 amid channel 1's content take the fast path; the three-frame body, the
    # undecodable properties and channel 1's interleaved content do not.
    assert [bool(after) for after in taken] == [True] * 5 + [False, False, False, True]
    bad = next(e for e in deliveries if e.properties_error is not None)
    assert (bad.body, bad.properties) == (b"bad", Props())
    rich = next(e for e in deliveries if e.channel_id == 2 and e.body == b'{"a": 1}')
    assert rich.properties == RICH
    assert rich.properties.headers == RICH.headers
    empty = next(e for e in deliveries if e.body == b"")
    assert empty.properties.message_id == "e"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=4200), max_size=12),
)
def test_a_stream_in_random_chunks_gives_the_events_it_gives_whole(
    names: list[str], sizes: list[int]
) -> None:
    data = stream(names)
    pieces = []
    pos = 0
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    pieces.append(data[pos:])
    whole = feed(ready(), [data])
    assert whole[1] is None
    assert feed(ready(), [p for p in pieces if p]) == whole
    with fast_path_off():
        assert feed(ready(), [data]) == whole


def test_a_stream_cut_at_every_boundary_gives_the_events_it_gives_whole() -> None:
    data = stream(["plain", "empty body", "rich", "return", "no properties", "heartbeat"])
    whole = feed(ready(), [data])
    assert whole[1] is None
    assert sum(isinstance(e, Delivery) for e in whole[0]) == 4
    for cut in range(1, len(data)):
        assert feed(ready(), [data[:cut], data[cut:]]) == whole, cut


def _frame(frame_type: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + end


DELIVER_1 = server(1, Deliver("ctag", 1, False, "", "q"))
HEADER_3 = server(1, ContentHeader(0, 3, Props(delivery_mode=2)))
HEADER_3_PAYLOAD = HEADER_3[7:-1]

# A delivery's frames complete in one read, broken in one place each: the error the
# general path raises, and the message it has.
BROKEN: dict[str, tuple[bytes, str]] = {
    "body longer than announced": (
        DELIVER_1 + HEADER_3 + server(1, ContentBody(b"abcd")),
        "more body bytes on channel 1 than the 3 its content header announced",
    ),
    "header without the frame-end octet": (
        DELIVER_1 + _frame(2, 1, HEADER_3_PAYLOAD, b"\x00") + server(1, ContentBody(b"abc")),
        "does not end with the frame-end octet 0xCE",
    ),
    "body without the frame-end octet": (
        DELIVER_1 + HEADER_3 + _frame(3, 1, b"abc", b"\x01"),
        "does not end with the frame-end octet 0xCE",
    ),
    "body over the frame limit": (
        DELIVER_1
        + server(1, ContentHeader(0, FRAME_MAX, Props()))
        + _frame(3, 1, b"b" * FRAME_MAX),
        f"more than the frame limit of {FRAME_MAX}",
    ),
    "header of another class": (
        DELIVER_1
        + _frame(2, 1, struct.pack(">HHQH", 61, 0, 3, 0))
        + server(1, ContentBody(b"abc")),
        "content header of class 61 on channel 1",
    ),
    "header too short": (
        DELIVER_1 + _frame(2, 1, b"\x00\x3c") + server(1, ContentBody(b"abc")),
        "cannot be decoded",
    ),
    "deliver too short": (
        _frame(1, 1, b"\x00\x3c\x00\x3c") + HEADER_3 + server(1, ContentBody(b"abc")),
        "cannot be decoded",
    ),
    "a method instead of the header": (
        DELIVER_1 + server(1, commands.Basic.Ack(1)) + HEADER_3,
        "in the middle of the content of Basic.Deliver",
    ),
    "a method instead of the body": (
        DELIVER_1 + HEADER_3 + server(1, commands.Basic.Ack(1)),
        "in the middle of the content of Basic.Deliver",
    ),
    "a second header": (
        DELIVER_1 + HEADER_3 + HEADER_3,
        "second content header on channel 1",
    ),
    "deliver on a channel that is not open": (
        server(5, Deliver("ctag", 1, False, "", "q"))
        + server(5, ContentHeader(0, 3, Props()))
        + server(5, ContentBody(b"abc")),
        "method frame for channel 5, which is not open",
    ),
    "deliver on channel 0": (
        server(0, Deliver("ctag", 1, False, "", "q")) + HEADER_3 + server(1, ContentBody(b"abc")),
        "Basic.Deliver on channel 0, which carries only connection-class methods",
    ),
    "body frame of an unknown type": (
        DELIVER_1 + HEADER_3 + _frame(9, 1, b"abc"),
        "frame of unknown type 9",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_delivery_raises_the_general_paths_error_on_both_paths(name: str) -> None:
    data, message = BROKEN[name]
    whole = feed(ready(), [data])
    with fast_path_off():
        general = feed(ready(), [data])
    assert whole == general == feed(ready(), bytewise(data))
    assert whole[1] is not None
    assert message in whole[1]


def test_a_delivery_while_content_is_in_progress_is_refused_on_both_paths() -> None:
    # basic.get-ok's content is under way on channel 1: a whole delivery there is an error.
    conn = ready()
    conn.send_method(1, commands.Basic.Get(queue="q"))
    conn.receive_data(server(1, commands.Basic.GetOk(1, False, "", "q", 0)))
    data = DELIVER_1 + HEADER_3 + server(1, ContentBody(b"abc"))
    _, error = feed(conn, [data])
    assert error is not None
    assert "Basic.Deliver on channel 1 in the middle of the content of Basic.GetOk" in error


def test_a_delivery_on_a_channel_still_opening_is_refused() -> None:
    conn = connect(tune=(2047, FRAME_MAX, 60))
    channel_id = conn.open_channel()
    data = server_content(channel_id, Deliver("ctag", 1, False, "", "q"), b"abc")
    _, error = feed(conn, [data])
    assert error is not None
    assert f"Basic.Deliver on channel {channel_id} before channel.open-ok" in error


def test_a_delivery_on_a_channel_being_closed_is_dropped() -> None:
    conn = ready()
    conn.close_channel(1)
    data = stream(["plain", "rich"])
    events, error = feed(conn, [data])
    assert error is None
    assert [e.channel_id for e in events if isinstance(e, Delivery)] == [2]
