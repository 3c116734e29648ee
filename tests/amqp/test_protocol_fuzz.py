"""Property tests of the AMQP core's input side.

Whatever bytes arrive, ``receive_data`` returns documented events or raises
RemoteProtocolError (never another exception, never a hang), and a valid byte stream
gives the same events however it is split.

A session has three phases: the handshake, the opening of channels 1 and 2, and the
traffic that follows the client's requests. The client's steps between the phases
are taken by ``drive`` as soon as they are due, so each phase is fed, split and
mutated on its own.
"""

from __future__ import annotations

import functools
import itertools
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from strictconsume.amqp._errors import LocalProtocolError, RemoteProtocolError, UnsupportedSetting
from strictconsume.amqp._protocol import (
    ChannelState,
    ConnectionState,
    Delivery,
    Event,
    GetResult,
    ProtocolConnection,
    PublishConfirmed,
    Returned,
)
from tests.amqp.test_protocol import (
    Props,
    new_connection,
    norm,
    server,
    server_content,
    start_frame,
    tune_frame,
)

EVENT_TYPES = typing.get_args(Event)
FRAME_MAX = 4096
BIG_BODY = bytes(range(256)) * 40  # 10240 bytes: three body frames at frame_max 4096

HANDSHAKE = [
    start_frame(),
    tune_frame(0, FRAME_MAX, 60),
    server(0, commands.Connection.OpenOk()),
]
CHANNELS = [
    server(1, commands.Channel.OpenOk()),
    server(2, commands.Channel.OpenOk()),
]
_deliver = commands.Basic.Deliver("ctag", 1, False, "ex", "rk")
_deliver_frames = server_content(
    1, _deliver, BIG_BODY, Props(content_type="text/plain", headers={"n": 1}), frame_max=FRAME_MAX
)
_deliver_head = len(server(1, _deliver)) + len(
    server(1, ContentHeader(0, len(BIG_BODY), Props(content_type="text/plain", headers={"n": 1})))
)
TRAFFIC = [
    server(1, commands.Basic.QosOk(), commands.Basic.ConsumeOk("ctag")),
    server(2, commands.Confirm.SelectOk(), commands.Queue.DeclareOk("q", 0, 0)),
    # A delivery on channel 1 with a confirm of channel 2 in the middle of its content.
    _deliver_frames[:_deliver_head],
    server(2, commands.Basic.Ack(1)),
    _deliver_frames[_deliver_head:],
    server_content(2, commands.Basic.Return(312, "NO_ROUTE", "", "nowhere"), b"two"),
    server(2, commands.Basic.Ack(2, multiple=True)),
    server_content(1, commands.Basic.GetOk(7, True, "", "q", 5), b"got", Props(priority=1)),
    server(0, Heartbeat()),
    server_content(1, commands.Basic.Deliver("ctag", 2, True, "", "q"), b""),
    server(2, commands.Basic.Nack(3, requeue=False)),
    server(0, commands.Connection.Blocked("low on memory"), commands.Connection.Unblocked()),
    server(1, commands.Channel.Flow(active=False), commands.Basic.Cancel("ctag")),
    server(2, commands.Channel.Close(406, "PRECONDITION_FAILED - unknown delivery tag 9", 60, 80)),
    server(0, commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)),
]
PHASES = [b"".join(HANDSHAKE), b"".join(CHANNELS), b"".join(TRAFFIC)]


def client_requests(conn: ProtocolConnection) -> None:
    """What the client asks once both channels are open (TRAFFIC answers it)."""
    conn.send_method(1, commands.Basic.Qos(prefetch_count=10))
    conn.send_method(1, commands.Basic.Consume(queue="q", consumer_tag="ctag"))
    conn.send_method(2, commands.Confirm.Select())
    conn.send_method(2, commands.Queue.Declare(queue="q"))
    conn.send_method(1, commands.Basic.Get(queue="q"))
    assert conn.publish(2, exchange="", routing_key="q", body=b"one") == 1
    assert conn.publish(2, exchange="", routing_key="nowhere", body=b"two", mandatory=True) == 2
    assert conn.publish(2, exchange="", routing_key="q", body=b"three") == 3


def drive(conn: ProtocolConnection, phases: list[list[bytes]]) -> list[Event]:
    """Feed each phase's chunks in turn, taking the client's steps when they are due."""
    events: list[Event] = []
    channels_requested = requested = False
    for chunks in phases:
        for chunk in chunks:
            events.extend(conn.receive_data(chunk))
        if conn.state is ConnectionState.OPEN and not channels_requested:
            conn.open_channel()
            conn.open_channel()
            channels_requested = True
        elif (
            not requested
            and conn.channel_state(1) is ChannelState.OPEN
            and conn.channel_state(2) is ChannelState.OPEN
        ):
            client_requests(conn)
            requested = True
        conn.data_to_send()
    return events


def fresh() -> ProtocolConnection:
    conn = new_connection(frame_max=FRAME_MAX)
    conn.initiate()
    conn.data_to_send()
    return conn


def ready_for_traffic() -> ProtocolConnection:
    """A connection through the handshake with both channels open and the requests sent."""
    conn = fresh()
    drive(conn, [[PHASES[0]], [PHASES[1]]])
    assert conn.channel_state(2) is ChannelState.OPEN
    return conn


def reference_events() -> list[Event]:
    return drive(fresh(), [[phase] for phase in PHASES])


@functools.cache
def reference() -> list[object]:
    """The valid session's events, each phase fed whole, made comparable."""
    return norm(reference_events())


def check_events(events: list[Event]) -> None:
    """Every event is one of the documented types with well-typed fields."""
    for event in events:
        assert isinstance(event, EVENT_TYPES), event
        if isinstance(event, Delivery | GetResult | Returned):
            assert type(event.body) is bytes
            assert isinstance(event.properties, commands.Basic.Properties)
        if isinstance(event, PublishConfirmed):
            assert event.publish_tags
            assert list(event.publish_tags) == sorted(set(event.publish_tags))


def feed_expecting_only_remote_errors(
    conn: ProtocolConnection, phases: list[list[bytes]], *, handshake_mutated: bool = False
) -> None:
    local_error: LocalProtocolError | None = None
    try:
        check_events(drive(conn, phases))
    except RemoteProtocolError:
        assert conn.state is ConnectionState.CLOSED
        with pytest.raises(RemoteProtocolError, match="already failed"):
            conn.receive_data(b"\x08\x00\x00\x00\x00\x00\x00\xce")
    except LocalProtocolError as exc:
        local_error = exc
    if local_error is not None:
        # The only local errors input can cause: a mutated connection.start that no
        # longer offers PLAIN, or whose version refuses our frame_max, or a mutated
        # connection.tune whose channel_max leaves no channel for the traffic.
        assert handshake_mutated
        assert isinstance(local_error, UnsupportedSetting) or any(
            documented in str(local_error)
            for documented in ("authentication mechanism", "channels the broker allows")
        )


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


MUTATION = st.tuples(
    st.sampled_from(("flip", "replace", "insert", "delete", "truncate")),
    st.integers(min_value=0, max_value=2**20),
    st.integers(min_value=0, max_value=255),
)
CUTS = st.lists(st.integers(min_value=0, max_value=2**20), max_size=12)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in mutations:
        i = where % (len(buf) + 1)
        if kind == "insert":
            buf.insert(i, value)
        elif kind == "truncate":
            del buf[i:]
        elif i < len(buf):
            if kind == "flip":
                buf[i] ^= 1 << (value % 8)
            elif kind == "replace":
                buf[i] = value
            else:
                del buf[i]
    return bytes(buf)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_reference_session_events() -> None:
    # The session the properties below rely on: every kind of traffic, and valid.
    names = [type(e).__name__ if not isinstance(e, tuple) else e[0] for e in reference()]
    assert names == [
        "ConnectionOpened",
        "ChannelOpened",
        "ChannelOpened",
        "MethodReceived",  # qos-ok
        "MethodReceived",  # consume-ok
        "MethodReceived",  # select-ok
        "MethodReceived",  # declare-ok
        "PublishConfirmed",  # in the middle of channel 1's content
        "Delivery",
        "Returned",
        "PublishConfirmed",
        "GetResult",
        "HeartbeatReceived",
        "Delivery",
        "PublishConfirmed",
        "ConnectionBlocked",
        "ConnectionUnblocked",
        "ChannelFlow",
        "ConsumerCancelledByBroker",
        "ChannelClosedByBroker",
        "ConnectionClosedByBroker",
    ]
    events = reference_events()
    confirms = [e for e in events if isinstance(e, PublishConfirmed)]
    assert [(c.publish_tags, c.ack) for c in confirms] == [
        ((1,), True),
        ((2,), True),
        ((3,), False),
    ]
    [returned] = [e for e in events if isinstance(e, Returned)]
    assert returned.publish_tag == 2
    assert [e.body for e in events if isinstance(e, Delivery)] == [BIG_BODY, b""]


@FUZZ
@given(st.data())
def test_a_valid_session_split_anywhere_gives_the_same_events(data: st.DataObject) -> None:
    phases = [split(phase, data.draw(CUTS)) for phase in PHASES]
    events = drive(fresh(), phases)
    check_events(events)
    assert norm(events) == reference()


@FUZZ
@given(st.binary(min_size=1, max_size=600))
def test_random_bytes_instead_of_the_handshake(garbage: bytes) -> None:
    feed_expecting_only_remote_errors(fresh(), [[garbage]], handshake_mutated=True)


@FUZZ
@given(st.binary(min_size=1, max_size=600), CUTS)
def test_random_bytes_after_the_handshake(garbage: bytes, cuts: list[int]) -> None:
    feed_expecting_only_remote_errors(ready_for_traffic(), [split(garbage, cuts)])


@FUZZ
@given(st.lists(MUTATION, min_size=1, max_size=4), CUTS)
def test_mutated_traffic_after_a_valid_handshake(
    mutations: list[tuple[str, int, int]], cuts: list[int]
) -> None:
    traffic = mutate(PHASES[2], mutations)
    feed_expecting_only_remote_errors(ready_for_traffic(), [split(traffic, cuts)])


@FUZZ
@given(st.lists(st.lists(MUTATION, max_size=3), min_size=3, max_size=3), CUTS)
def test_mutated_handshake_and_traffic(
    mutations: list[list[tuple[str, int, int]]], cuts: list[int]
) -> None:
    phases = [split(mutate(phase, m), cuts) for phase, m in zip(PHASES, mutations, strict=True)]
    feed_expecting_only_remote_errors(fresh(), phases, handshake_mutated=True)


@FUZZ
@given(st.integers(min_value=0, max_value=len(PHASES[2])), st.binary(max_size=64))
def test_valid_prefix_then_garbage(cut: int, garbage: bytes) -> None:
    conn = ready_for_traffic()
    feed_expecting_only_remote_errors(conn, [[PHASES[2][:cut], garbage]])
