"""Sans-IO tests of the AMQP 0-9-1 core: exact frames in, exact events and frames out.

The broker side is played by pamqp: ``server(...)`` marshals exactly what a broker
would send, and ``sent(conn)`` unmarshals what the client queued, so every test
states the precise frames on the wire in both directions.
"""

from __future__ import annotations

import datetime
import re
import struct
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

import strictconsume
from strictconsume.amqp._errors import (
    LocalProtocolError,
    RemoteProtocolError,
    UnsupportedSetting,
)
from strictconsume.amqp._protocol import (
    ChannelCloseCompleted,
    ChannelClosedByBroker,
    ChannelFlow,
    ChannelOpened,
    ChannelState,
    ConnectionBlocked,
    ConnectionCloseCompleted,
    ConnectionClosedByBroker,
    ConnectionOpened,
    ConnectionState,
    ConnectionUnblocked,
    ConsumerCancelledByBroker,
    Credentials,
    Delivery,
    Event,
    GetResult,
    HeartbeatReceived,
    MethodReceived,
    ProtocolConnection,
    PublishConfirmed,
    Returned,
    server_version,
)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
SERVER_PROPERTIES: dict[str, Any] = {
    "product": "RabbitMQ",
    "version": "4.0.5",
    "capabilities": {"publisher_confirms": True, "consumer_cancel_notify": True},
}
Props = commands.Basic.Properties

# Helpers: the broker's side -----------------------------------------------------------


def server(channel: int, *values: pamqp.frame.FrameTypes) -> bytes:
    """The exact bytes of these frames as a broker sends them on ``channel``."""
    return b"".join(pamqp.frame.marshal(value, channel) for value in values)


def server_content(
    channel: int,
    method: Frame,
    body: bytes,
    properties: commands.Basic.Properties | None = None,
    *,
    frame_max: int = 131072,
) -> bytes:
    """A content-carrying method, its content header and its body frames."""
    chunk = frame_max - 8
    parts = [
        server(channel, method),
        server(channel, ContentHeader(0, len(body), properties)),
    ]
    parts.extend(
        server(channel, ContentBody(body[i : i + chunk])) for i in range(0, len(body), chunk)
    )
    return b"".join(parts)


def parse(data: bytes) -> list[tuple[int, pamqp.frame.FrameTypes]]:
    """Split ``data`` into frames with pamqp: (channel, frame) pairs."""
    frames = []
    pos = 0
    while pos < len(data):
        consumed, channel, value = pamqp.frame.unmarshal(data[pos:])
        frames.append((channel, value))
        pos += consumed
    return frames


def describe(value: pamqp.frame.FrameTypes) -> tuple[object, ...]:
    """A comparable description of a pamqp frame (pamqp methods have no __eq__)."""
    if isinstance(value, Frame):
        return (value.name, dict(value))
    if isinstance(value, ContentHeader):
        return ("ContentHeader", value.body_size, dict(value.properties))
    if isinstance(value, ContentBody):
        return ("ContentBody", value.value)
    if isinstance(value, ProtocolHeader):
        return ("ProtocolHeader", value.major_version, value.minor_version, value.revision)
    assert isinstance(value, Heartbeat)
    return ("Heartbeat",)


def sent(conn: ProtocolConnection) -> list[tuple[int, tuple[object, ...]]]:
    """Drain what the client queued and describe each frame."""
    pending = conn.bytes_pending()
    data = conn.data_to_send()
    assert len(data) == pending
    assert conn.bytes_pending() == 0
    return [(channel, describe(value)) for channel, value in parse(data)]


def frames(channel: int, *values: pamqp.frame.FrameTypes) -> list[tuple[int, tuple[object, ...]]]:
    """The descriptions ``sent()`` returns for these frames on ``channel``."""
    return [(channel, describe(value)) for value in values]


def norm(events: list[Event]) -> list[object]:
    """Events made comparable: MethodReceived carries a pamqp method without __eq__."""
    return [
        ("MethodReceived", e.channel_id, describe(e.method)) if isinstance(e, MethodReceived) else e
        for e in events
    ]


def state_of(conn: ProtocolConnection) -> ConnectionState:
    """The connection's state (a call, so that mypy does not narrow it across steps)."""
    return conn.state


def start_frame(
    mechanisms: str = "AMQPLAIN PLAIN", server_properties: dict[str, Any] | None = None
) -> bytes:
    return server(
        0,
        commands.Connection.Start(
            server_properties=server_properties or SERVER_PROPERTIES,
            mechanisms=mechanisms,
            locales="en_US",
        ),
    )


def tune_frame(channel_max: int = 2047, frame_max: int = 131072, heartbeat: int = 60) -> bytes:
    return server(0, commands.Connection.Tune(channel_max, frame_max, heartbeat))


def new_connection(**kwargs: Any) -> ProtocolConnection:
    kwargs.setdefault("credentials", Credentials("guest", "s3cret"))
    return ProtocolConnection(**kwargs)


def connect(
    *, tune: tuple[int, int, int] = (2047, 131072, 60), **kwargs: Any
) -> ProtocolConnection:
    """A connection through the handshake, with its output drained."""
    conn = new_connection(**kwargs)
    conn.initiate()
    assert conn.receive_data(start_frame()) == []
    assert conn.receive_data(tune_frame(*tune)) == []
    events = conn.receive_data(server(0, commands.Connection.OpenOk()))
    assert len(events) == 1
    assert isinstance(events[0], ConnectionOpened)
    conn.data_to_send()
    assert state_of(conn) is ConnectionState.OPEN
    return conn


def open_channel(conn: ProtocolConnection) -> int:
    channel_id = conn.open_channel()
    assert sent(conn) == frames(channel_id, commands.Channel.Open())
    assert conn.receive_data(server(channel_id, commands.Channel.OpenOk())) == [
        ChannelOpened(channel_id)
    ]
    assert conn.channel_state(channel_id) is ChannelState.OPEN
    return channel_id


def confirm_channel(conn: ProtocolConnection) -> int:
    channel_id = open_channel(conn)
    conn.send_method(channel_id, commands.Confirm.Select())
    assert sent(conn) == frames(channel_id, commands.Confirm.Select())
    return channel_id


def expected_client_properties(**extra: Any) -> dict[str, Any]:
    return {
        "product": "strictconsume",
        "version": strictconsume.__version__,
        "platform": "Python {}.{}".format(*__import__("sys").version_info[:2]),
        "capabilities": {
            "publisher_confirms": True,
            "consumer_cancel_notify": True,
            "basic.nack": True,
            "connection.blocked": True,
            "authentication_failure_close": True,
            "exchange_exchange_bindings": True,
            "per_consumer_qos": True,
        },
        **extra,
    }


# Handshake ------------------------------------------------------------------------------


def test_initiate_queues_the_protocol_header() -> None:
    conn = new_connection()
    assert state_of(conn) is ConnectionState.INITIAL
    assert conn.bytes_pending() == 0
    assert conn.data_to_send() == b""
    conn.initiate()
    assert state_of(conn) is ConnectionState.AWAIT_START
    assert conn.bytes_pending() == 8
    assert conn.data_to_send() == PROTOCOL_HEADER
    assert conn.data_to_send() == b""


def test_full_handshake_with_plain() -> None:
    conn = new_connection(vhost="orders", heartbeat=30)
    assert (conn.channel_max, conn.frame_max, conn.heartbeat) == (2047, 131072, 30)
    assert conn.server_properties == {}
    conn.initiate()
    assert conn.data_to_send() == PROTOCOL_HEADER

    assert conn.receive_data(start_frame()) == []
    assert state_of(conn) is ConnectionState.AWAIT_TUNE
    assert conn.server_properties == SERVER_PROPERTIES
    [(channel, start_ok)] = parse(conn.data_to_send())
    assert channel == 0
    assert isinstance(start_ok, commands.Connection.StartOk)
    assert start_ok.mechanism == "PLAIN"
    assert start_ok.response == "\0guest\0s3cret"
    assert start_ok.locale == "en_US"
    assert start_ok.client_properties == expected_client_properties()

    assert conn.receive_data(tune_frame(2047, 131072, 60)) == []
    assert state_of(conn) is ConnectionState.AWAIT_OPEN_OK
    assert sent(conn) == frames(
        0,
        commands.Connection.TuneOk(2047, 131072, 30),
        commands.Connection.Open(virtual_host="orders"),
    )

    events = conn.receive_data(server(0, commands.Connection.OpenOk()))
    assert events == [ConnectionOpened(SERVER_PROPERTIES, 2047, 131072, 30)]
    assert state_of(conn) is ConnectionState.OPEN
    assert conn.data_to_send() == b""


def test_start_ok_bytes_are_exactly_pamqps() -> None:
    conn = new_connection(credentials=Credentials("user", "pw"))
    conn.initiate()
    conn.data_to_send()
    conn.receive_data(start_frame())
    expected = pamqp.frame.marshal(
        commands.Connection.StartOk(
            client_properties=expected_client_properties(),
            mechanism="PLAIN",
            response="\0user\0pw",
            locale="en_US",
        ),
        0,
    )
    assert conn.data_to_send() == expected


def test_client_properties_are_merged_over_the_defaults() -> None:
    conn = new_connection(
        client_properties={"connection_name": "billing", "capabilities": {"basic.nack": False}},
        locale="de_DE",
    )
    conn.initiate()
    conn.data_to_send()
    conn.receive_data(start_frame())
    [(_, start_ok)] = parse(conn.data_to_send())
    assert isinstance(start_ok, commands.Connection.StartOk)
    expected = expected_client_properties(connection_name="billing")
    expected["capabilities"]["basic.nack"] = False
    assert start_ok.client_properties == expected
    assert start_ok.locale == "de_DE"


@pytest.mark.parametrize(
    ("ours", "broker", "negotiated"),
    [
        # (channel_max, frame_max, heartbeat)
        ((2047, 131072, None), (2047, 131072, 60), (2047, 131072, 60)),
        ((2047, 131072, None), (0, 0, 0), (2047, 131072, 0)),
        ((2047, 131072, 0), (2047, 131072, 60), (2047, 131072, 0)),
        ((2047, 131072, 30), (2047, 131072, 60), (2047, 131072, 30)),
        ((2047, 131072, 120), (2047, 131072, 60), (2047, 131072, 60)),
        ((2047, 131072, 30), (2047, 131072, 0), (2047, 131072, 30)),
        ((2047, 131072, None), (100, 8192, 10), (100, 8192, 10)),
        ((10, 4096, None), (2047, 131072, 60), (10, 4096, 60)),
        ((65535, 1048576, None), (0, 0, 60), (65535, 1048576, 60)),
        ((65535, 131072, None), (65535, 0, 5), (65535, 131072, 5)),
    ],
)
def test_tune_negotiation(
    ours: tuple[int, int, int | None],
    broker: tuple[int, int, int],
    negotiated: tuple[int, int, int],
) -> None:
    conn = new_connection(channel_max=ours[0], frame_max=ours[1], heartbeat=ours[2])
    conn.initiate()
    conn.receive_data(start_frame())
    conn.data_to_send()
    assert conn.receive_data(tune_frame(*broker)) == []
    assert sent(conn) == frames(
        0,
        commands.Connection.TuneOk(*negotiated),
        commands.Connection.Open(virtual_host="/"),
    )
    assert (conn.channel_max, conn.frame_max, conn.heartbeat) == negotiated
    events = conn.receive_data(server(0, commands.Connection.OpenOk()))
    assert events == [ConnectionOpened(SERVER_PROPERTIES, *negotiated)]


def test_broker_frame_max_below_the_minimum_is_a_protocol_error() -> None:
    conn = new_connection()
    conn.initiate()
    conn.receive_data(start_frame())
    with pytest.raises(RemoteProtocolError, match="frame_max 1024"):
        conn.receive_data(tune_frame(2047, 1024, 60))


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("4.3.6", (4, 3, 6)),
        (b"3.10.8", (3, 10, 8)),
        ("4.1.0-rc.1", (4, 1, 0)),
        ("3.13.7+2.g1234", (3, 13, 7)),
        ("4.2", (4, 2, 0)),
        ("4", (4, 0, 0)),
        ("", None),
        ("unknown", None),
        (7, None),
        (None, None),
    ],
)
def test_server_version_is_read_from_connection_start(version: object, expected: object) -> None:
    properties = {} if version is None else {"version": version}
    assert server_version(properties) == expected


@pytest.mark.parametrize("version", ["4.1.0", "4.3.6", "5.0.0"])
def test_a_frame_max_the_broker_refuses_is_never_sent(version: str) -> None:
    """RabbitMQ 4.1 raised the least frame_max to 8192 and closes the socket, without
    a reason, on a tune-ok below it: the handshake stops at connection.start instead,
    with an error naming the minimum, and sends nothing more."""
    conn = new_connection(frame_max=4096)
    conn.initiate()
    conn.data_to_send()
    with pytest.raises(UnsupportedSetting, match="frame_max 4096 is below 8192") as info:
        conn.receive_data(start_frame(server_properties={**SERVER_PROPERTIES, "version": version}))
    assert f"this broker is {version}" in str(info.value)
    assert isinstance(info.value, LocalProtocolError)
    assert conn.data_to_send() == b""
    assert state_of(conn) is ConnectionState.CLOSED


@pytest.mark.parametrize(
    ("version", "frame_max"), [("4.0.5", 4096), ("3.10.8", 4096), ("4.3.6", 8192)]
)
def test_a_frame_max_the_broker_accepts_goes_through(version: str, frame_max: int) -> None:
    conn = new_connection(frame_max=frame_max)
    conn.initiate()
    conn.data_to_send()
    assert (
        conn.receive_data(start_frame(server_properties={**SERVER_PROPERTIES, "version": version}))
        == []
    )
    assert conn.server_version == server_version({"version": version})
    conn.receive_data(tune_frame(2047, 131072, 60))
    start_ok, tune_ok, open_ = (frame for _, frame in parse(conn.data_to_send()))
    assert isinstance(start_ok, commands.Connection.StartOk)
    assert isinstance(open_, commands.Connection.Open)
    assert isinstance(tune_ok, commands.Connection.TuneOk)
    assert tune_ok.frame_max == frame_max


def test_external_mechanism_sends_an_empty_response() -> None:
    conn = ProtocolConnection(credentials=None, auth_mechanism="EXTERNAL")
    conn.initiate()
    conn.data_to_send()
    conn.receive_data(start_frame(mechanisms="PLAIN EXTERNAL AMQPLAIN"))
    [(_, start_ok)] = parse(conn.data_to_send())
    assert isinstance(start_ok, commands.Connection.StartOk)
    assert start_ok.mechanism == "EXTERNAL"
    assert start_ok.response == ""


def test_mechanism_not_offered_names_what_the_broker_offers() -> None:
    conn = ProtocolConnection(credentials=None, auth_mechanism="EXTERNAL")
    conn.initiate()
    conn.data_to_send()
    with pytest.raises(LocalProtocolError, match="offers AMQPLAIN PLAIN") as info:
        conn.receive_data(start_frame(mechanisms="AMQPLAIN PLAIN"))
    assert "EXTERNAL" in str(info.value)
    assert conn.data_to_send() == b""
    assert state_of(conn) is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError, match="already failed"):
        conn.receive_data(b"\x01")


def test_wrong_version_in_connection_start() -> None:
    conn = new_connection()
    conn.initiate()
    start = server(0, commands.Connection.Start(version_major=0, version_minor=8))
    with pytest.raises(RemoteProtocolError, match="0-8"):
        conn.receive_data(start)


def test_connection_secure_is_not_supported() -> None:
    conn = new_connection()
    conn.initiate()
    conn.receive_data(start_frame())
    with pytest.raises(RemoteProtocolError, match=re.escape("connection.secure")):
        conn.receive_data(server(0, commands.Connection.Secure("challenge")))


def test_broker_refuses_login_during_handshake() -> None:
    conn = new_connection()
    conn.initiate()
    conn.receive_data(start_frame())
    conn.data_to_send()
    text = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"
    events = conn.receive_data(server(0, commands.Connection.Close(403, text, 0, 0)))
    assert events == [ConnectionClosedByBroker(403, text, 0, 0)]
    assert state_of(conn) is ConnectionState.CLOSED
    assert sent(conn) == frames(0, commands.Connection.CloseOk())


def test_broker_refuses_the_vhost() -> None:
    conn = new_connection(vhost="nope")
    conn.initiate()
    conn.receive_data(start_frame())
    conn.receive_data(tune_frame())
    conn.data_to_send()
    text = "NOT_ALLOWED - vhost nope not found"
    events = conn.receive_data(server(0, commands.Connection.Close(530, text, 10, 40)))
    assert events == [ConnectionClosedByBroker(530, text, 10, 40)]
    assert sent(conn) == frames(0, commands.Connection.CloseOk())
    assert state_of(conn) is ConnectionState.CLOSED
    # Bytes after the close are ignored.
    assert conn.receive_data(server(0, commands.Connection.OpenOk())) == []


def test_broker_answers_with_another_protocol_version() -> None:
    conn = new_connection()
    conn.initiate()
    assert conn.receive_data(b"AMQ") == []  # could still be a protocol header
    with pytest.raises(RemoteProtocolError, match="1-0-0") as info:
        conn.receive_data(b"P\x00\x01\x00\x00")
    assert "does not support AMQP 0-9-1" in str(info.value)


def test_http_server_on_the_port() -> None:
    conn = new_connection()
    conn.initiate()
    response = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with pytest.raises(RemoteProtocolError, match="is the port an AMQP port") as info:
        conn.receive_data(response)
    assert repr(response[:32]) in str(info.value)
    assert "does not speak AMQP 0-9-1" in str(info.value)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xfe\x00\x01",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x01\x00\x05\x00\x00\x00\x04abcd\xce",  # a method frame, but not on channel 0
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",  # a TLS client hello
    ],
)
def test_garbage_instead_of_connection_start(garbage: bytes) -> None:
    conn = new_connection()
    conn.initiate()
    with pytest.raises(RemoteProtocolError, match="does not speak AMQP 0-9-1"):
        conn.receive_data(garbage)
    assert state_of(conn) is ConnectionState.CLOSED


def test_first_frame_is_not_connection_start() -> None:
    conn = new_connection()
    conn.initiate()
    with pytest.raises(
        RemoteProtocolError, match=re.escape("Connection.Tune while the connection is")
    ):
        conn.receive_data(tune_frame())


def test_receive_before_initiate_is_a_local_error() -> None:
    conn = new_connection()
    with pytest.raises(LocalProtocolError, match="before initiate"):
        conn.receive_data(start_frame())


def test_empty_data_returns_no_events() -> None:
    conn = connect()
    assert conn.receive_data(b"") == []
    assert state_of(conn) is ConnectionState.OPEN


# Framing --------------------------------------------------------------------------------


def test_frame_larger_than_the_limit_is_rejected_from_its_header() -> None:
    conn = new_connection()
    conn.initiate()
    # Only the 7-byte header of a 200 kB connection.start: refused without buffering.
    with pytest.raises(RemoteProtocolError, match="more than the frame limit of 131072"):
        conn.receive_data(b"\x01\x00\x00\x00\x03\x0d\x40")


def test_frame_limit_after_tune_is_the_negotiated_frame_max() -> None:
    conn = connect(tune=(2047, 8192, 60))
    channel_id = open_channel(conn)
    body = b"x" * (8192 - 8)  # exactly frame_max with the overhead: accepted
    deliver = commands.Basic.Deliver("ctag", 1, False, "", "q")
    events = conn.receive_data(server_content(channel_id, deliver, body, frame_max=8192))
    assert len(events) == 1
    assert isinstance(events[0], Delivery)
    assert events[0].body == body
    too_big = pamqp.frame.marshal(ContentBody(b"y" * (8192 - 7)), channel_id)
    with pytest.raises(RemoteProtocolError, match="8193 bytes on channel 1"):
        conn.receive_data(too_big[:7])


def test_bad_frame_end_octet() -> None:
    conn = connect()
    frame = bytearray(server(0, commands.Connection.Blocked("low on memory")))
    frame[-1] = 0x00
    with pytest.raises(RemoteProtocolError, match="frame-end octet"):
        conn.receive_data(bytes(frame))


def test_unknown_frame_type() -> None:
    conn = connect()
    with pytest.raises(RemoteProtocolError, match="unknown type 4"):
        conn.receive_data(b"\x04\x00\x00\x00\x00\x00\x00\xce")


def test_undecodable_method_is_a_remote_error_chained_to_pamqps() -> None:
    conn = connect()
    # Method index 0x00990001 exists in no class.
    with pytest.raises(RemoteProtocolError, match="cannot be decoded") as info:
        conn.receive_data(b"\x01\x00\x00\x00\x00\x00\x04\x00\x99\x00\x01\xce")
    assert info.value.__cause__ is not None


def test_truncated_method_arguments_are_a_remote_error() -> None:
    conn = connect()
    frame = server(0, commands.Connection.Close(320, "CONNECTION_FORCED", 0, 0))
    # Cut the arguments short but keep the framing consistent.
    payload = frame[7:-1][:6]
    broken = b"\x01\x00\x00" + len(payload).to_bytes(4, "big") + payload + b"\xce"
    with pytest.raises(RemoteProtocolError, match="cannot be decoded"):
        conn.receive_data(broken)


def test_a_remote_error_is_sticky() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(RemoteProtocolError) as first:
        conn.receive_data(b"\x05" + b"\x00" * 7)
    assert state_of(conn) is ConnectionState.CLOSED
    with pytest.raises(RemoteProtocolError, match="already failed") as second:
        conn.receive_data(server(0, Heartbeat()))
    assert second.value.__cause__ is first.value
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.ack(channel_id, 1)
    assert conn.channel_state(channel_id) is None


def traffic_script() -> tuple[ProtocolConnection, list[bytes]]:
    """A fresh connection and the broker's frames of a whole session, in order.

    The client steps that must happen between frames are taken by ``feed_session``.
    """
    conn = new_connection(frame_max=4096, heartbeat=None)
    props = Props(content_type="application/json", headers={"x-attempt": 2}, delivery_mode=2)
    stream = [
        start_frame(),
        tune_frame(0, 4096, 60),
        server(0, commands.Connection.OpenOk()),
        server(1, commands.Channel.OpenOk()),
        server(1, commands.Basic.QosOk()),
        server(1, commands.Basic.ConsumeOk("ctag")),
        server(0, Heartbeat()),
        server_content(
            1,
            commands.Basic.Deliver("ctag", 1, False, "", "q"),
            b"a" * 10000,
            props,
            frame_max=4096,
        ),
        server_content(1, commands.Basic.Deliver("ctag", 2, True, "ex", "rk"), b""),
        server(0, commands.Connection.Blocked("low on memory")),
        server(0, commands.Connection.Unblocked()),
        server(1, commands.Basic.Cancel("ctag", nowait=False)),
        server(
            1, commands.Channel.Close(406, "PRECONDITION_FAILED - unknown delivery tag", 60, 80)
        ),
        server(0, commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)),
    ]
    return conn, stream


def feed_session(conn: ProtocolConnection, chunks: list[bytes]) -> list[Event]:
    """Feed the session's chunks, taking the client's steps as soon as they are due:
    open channel 1 once the connection is open, then set qos and consume on it."""
    events: list[Event] = []
    channel_requested = consuming = False
    for chunk in chunks:
        events.extend(conn.receive_data(chunk))
        if state_of(conn) is ConnectionState.OPEN and not channel_requested:
            assert conn.open_channel() == 1
            channel_requested = True
        if conn.channel_state(1) is ChannelState.OPEN and not consuming:
            conn.send_method(1, commands.Basic.Qos(prefetch_count=10))
            conn.send_method(1, commands.Basic.Consume(queue="q", consumer_tag="ctag"))
            consuming = True
        conn.data_to_send()
    return events


def test_byte_at_a_time_gives_the_same_events() -> None:
    conn, stream = traffic_script()
    conn.initiate()
    whole = feed_session(conn, stream)
    assert [type(e).__name__ for e in whole] == [
        "ConnectionOpened",
        "ChannelOpened",
        "MethodReceived",
        "MethodReceived",
        "HeartbeatReceived",
        "Delivery",
        "Delivery",
        "ConnectionBlocked",
        "ConnectionUnblocked",
        "ConsumerCancelledByBroker",
        "ChannelClosedByBroker",
        "ConnectionClosedByBroker",
    ]
    deliveries = [e for e in whole if isinstance(e, Delivery)]
    assert deliveries[0].body == b"a" * 10000
    assert deliveries[0].properties.headers == {"x-attempt": 2}

    conn2, _ = traffic_script()
    conn2.initiate()
    data = b"".join(stream)
    one_by_one = feed_session(conn2, [data[i : i + 1] for i in range(len(data))])
    assert norm(one_by_one) == norm(whole)


# Frame placement ------------------------------------------------------------------------


def test_connection_method_on_a_channel_is_an_error() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(RemoteProtocolError, match="belong on channel 0"):
        conn.receive_data(server(channel_id, commands.Connection.Blocked("x")))


def test_channel_method_on_channel_zero_is_an_error() -> None:
    conn = connect()
    with pytest.raises(RemoteProtocolError, match=re.escape("Basic.QosOk on channel 0")):
        conn.receive_data(server(0, commands.Basic.QosOk()))


def test_content_on_channel_zero_is_an_error() -> None:
    conn = connect()
    with pytest.raises(RemoteProtocolError, match="channel 0, which carries no content"):
        conn.receive_data(server(0, ContentHeader(0, 1, Props())))


def test_heartbeat_on_a_channel_is_an_error() -> None:
    conn = connect()
    open_channel(conn)
    with pytest.raises(RemoteProtocolError, match="malformed heartbeat"):
        conn.receive_data(b"\x08\x00\x01\x00\x00\x00\x00\xce")


def test_frames_for_a_channel_that_is_not_open() -> None:
    conn = connect()
    with pytest.raises(RemoteProtocolError, match="channel 7, which is not open"):
        conn.receive_data(server(7, commands.Basic.QosOk()))
    conn = connect()
    with pytest.raises(RemoteProtocolError, match="channel 3, which is not open"):
        conn.receive_data(server(3, ContentBody(b"abc")))


def test_method_a_broker_never_sends() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(RemoteProtocolError, match="only a client sends"):
        conn.receive_data(server(channel_id, commands.Basic.Qos(prefetch_count=1)))


def test_heartbeats_both_ways() -> None:
    conn = connect()
    assert conn.receive_data(server(0, Heartbeat())) == [HeartbeatReceived()]
    conn.send_heartbeat()
    assert conn.data_to_send() == b"\x08\x00\x00\x00\x00\x00\x00\xce"


# Content assembly -----------------------------------------------------------------------


def test_delivery_assembled_from_three_body_frames() -> None:
    conn = connect(tune=(2047, 4096, 60))
    channel_id = open_channel(conn)
    body = bytes(range(256)) * 40  # 10240 bytes: 4088 + 4088 + 2064
    props = Props(
        content_type="text/plain",
        message_id="m-1",
        timestamp=datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC),
        headers={"x-attempt": 1},
    )
    data = server_content(
        channel_id,
        commands.Basic.Deliver("ctag", 42, True, "shop", "order.created"),
        body,
        props,
        frame_max=4096,
    )
    frame_list = parse(data)
    assert [type(v) for _, v in frame_list] == [
        commands.Basic.Deliver,
        ContentHeader,
        ContentBody,
        ContentBody,
        ContentBody,
    ]
    # Everything but the last body frame completes nothing.
    last_body = len(pamqp.frame.marshal(ContentBody(body[8176:]), channel_id))
    assert conn.receive_data(data[:-last_body]) == []
    events = conn.receive_data(data[-last_body:])
    assert events == [
        Delivery(channel_id, "ctag", 42, True, "shop", "order.created", props, body),
    ]
    assert isinstance(events[0], Delivery)
    assert events[0].properties.message_id == "m-1"


def test_zero_length_body_is_complete_after_the_header() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    assert (
        conn.receive_data(server(channel_id, commands.Basic.Deliver("ctag", 1, False, "", "q")))
        == []
    )
    events = conn.receive_data(server(channel_id, ContentHeader(0, 0, Props(priority=3))))
    assert events == [Delivery(channel_id, "ctag", 1, False, "", "q", Props(priority=3), b"")]
    # The next message is independent of the first.
    events = conn.receive_data(
        server_content(channel_id, commands.Basic.Deliver("ctag", 2, False, "", "q"), b"next")
    )
    assert events == [Delivery(channel_id, "ctag", 2, False, "", "q", Props(), b"next")]


def test_body_longer_than_announced() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    data = server(
        channel_id,
        commands.Basic.Deliver("ctag", 1, False, "", "q"),
        ContentHeader(0, 3, Props()),
        ContentBody(b"ab"),
    )
    assert conn.receive_data(data) == []
    with pytest.raises(RemoteProtocolError, match="more body bytes on channel 1 than the 3"):
        conn.receive_data(server(channel_id, ContentBody(b"cd")))


def test_method_in_the_middle_of_content() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.receive_data(
        server(
            channel_id,
            commands.Basic.Deliver("ctag", 1, False, "", "q"),
            ContentHeader(0, 10, Props()),
            ContentBody(b"abc"),
        )
    )
    with pytest.raises(
        RemoteProtocolError, match=re.escape("in the middle of the content of Basic.Deliver")
    ):
        conn.receive_data(server(channel_id, commands.Basic.Deliver("ctag", 2, False, "", "q")))


def test_a_delivery_whose_properties_cannot_be_decoded_is_delivered_with_the_reason() -> None:
    """Properties pamqp cannot turn into Python values (here a message_id that is not
    UTF-8, as any client may publish) do not break the connection: the delivery comes
    with empty properties and the reason, and the next delivery is read as usual."""
    conn = connect()
    channel_id = open_channel(conn)
    good = Props(message_id="m-2")
    # A content header made by hand: class 60, weight 0, body size 3, the
    # message_id flag (bit 7), then a short string of two bytes that are not UTF-8.
    payload = struct.pack(">HHQH", 60, 0, 3, 1 << 7) + b"\x02\xff\xfe"
    bad_header = b"\x02" + struct.pack(">HI", channel_id, len(payload)) + payload + b"\xce"
    data = (
        server(channel_id, commands.Basic.Deliver("ctag", 1, False, "", "q"))
        + bad_header
        + server(channel_id, ContentBody(b"bad"))
        + server_content(channel_id, commands.Basic.Deliver("ctag", 2, False, "", "q"), b"ok", good)
    )
    first, second = conn.receive_data(data)
    assert isinstance(first, Delivery)
    assert (first.delivery_tag, first.body, first.properties) == (1, b"bad", Props())
    assert first.properties_error is not None
    assert "cannot be decoded" in first.properties_error
    assert second == Delivery(channel_id, "ctag", 2, False, "", "q", good, b"ok")


def test_method_between_deliver_and_header() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.receive_data(server(channel_id, commands.Basic.Deliver("ctag", 1, False, "", "q")))
    with pytest.raises(RemoteProtocolError, match="in the middle of the content"):
        conn.receive_data(server(channel_id, commands.Channel.Close(404, "x", 0, 0)))


def test_body_without_header() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.receive_data(server(channel_id, commands.Basic.Deliver("ctag", 1, False, "", "q")))
    with pytest.raises(
        RemoteProtocolError, match="body frame on channel 1 without a content header"
    ):
        conn.receive_data(server(channel_id, ContentBody(b"abc")))


def test_body_without_any_method() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(RemoteProtocolError, match="without a content header"):
        conn.receive_data(server(channel_id, ContentBody(b"abc")))


def test_header_without_method() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(RemoteProtocolError, match="content header on channel 1 without a basic"):
        conn.receive_data(server(channel_id, ContentHeader(0, 3, Props())))


def test_second_header_while_body_pending() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.receive_data(
        server(
            channel_id,
            commands.Basic.Deliver("ctag", 1, False, "", "q"),
            ContentHeader(0, 3, Props()),
        )
    )
    with pytest.raises(RemoteProtocolError, match="second content header"):
        conn.receive_data(server(channel_id, ContentHeader(0, 3, Props())))


def test_content_header_of_another_class() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.receive_data(server(channel_id, commands.Basic.Deliver("ctag", 1, False, "", "q")))
    header = bytearray(server(channel_id, ContentHeader(0, 0, Props())))
    header[7:9] = (50).to_bytes(2, "big")  # class 50 (queue) has no content
    with pytest.raises(RemoteProtocolError, match="class 50"):
        conn.receive_data(bytes(header))


def test_content_of_two_channels_interleaves() -> None:
    conn = connect()
    one = open_channel(conn)
    two = open_channel(conn)
    data = b"".join(
        [
            server(one, commands.Basic.Deliver("a", 1, False, "", "qa")),
            server(two, commands.Basic.Deliver("b", 1, False, "", "qb")),
            server(one, ContentHeader(0, 2, Props())),
            server(two, ContentHeader(0, 1, Props())),
            server(0, Heartbeat()),
            server(two, ContentBody(b"B")),
            server(one, ContentBody(b"A1")),
        ]
    )
    assert conn.receive_data(data) == [
        HeartbeatReceived(),
        Delivery(two, "b", 1, False, "", "qb", Props(), b"B"),
        Delivery(one, "a", 1, False, "", "qa", Props(), b"A1"),
    ]


def test_basic_get_ok_and_get_empty() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.send_method(channel_id, commands.Basic.Get(queue="q"))
    conn.send_method(channel_id, commands.Basic.Get(queue="q"))
    assert sent(conn) == frames(
        channel_id, commands.Basic.Get(queue="q"), commands.Basic.Get(queue="q")
    )
    get_ok = commands.Basic.GetOk(7, False, "", "q", 3)
    events = conn.receive_data(server_content(channel_id, get_ok, b"msg", Props(app_id="x")))
    assert events == [GetResult(channel_id, 7, False, "", "q", 3, Props(app_id="x"), b"msg")]
    events = conn.receive_data(server(channel_id, commands.Basic.GetEmpty()))
    assert norm(events) == [("MethodReceived", channel_id, describe(commands.Basic.GetEmpty()))]


def test_get_ok_without_a_get_is_an_error() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(
        RemoteProtocolError, match=re.escape("Basic.GetOk on channel 1, but no request")
    ):
        conn.receive_data(server(channel_id, commands.Basic.GetOk(1, False, "", "q", 0)))


# Publishing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunks"),
    [
        (0, []),
        (1, [1]),
        (4088, [4088]),
        (4089, [4088, 1]),
        (10000, [4088, 4088, 1824]),
        (3 * 4088, [4088, 4088, 4088]),
    ],
)
def test_publish_splits_the_body_at_frame_max(size: int, chunks: list[int]) -> None:
    conn = connect(tune=(2047, 4096, 60))
    channel_id = open_channel(conn)
    body = bytes(i % 251 for i in range(size))
    props = Props(content_type="application/octet-stream", delivery_mode=2)
    assert (
        conn.publish(channel_id, exchange="ex", routing_key="rk", body=body, properties=props)
        is None
    )
    pending = conn.bytes_pending()
    data = conn.data_to_send()
    assert len(data) == pending
    expected = [
        pamqp.frame.marshal(commands.Basic.Publish(exchange="ex", routing_key="rk"), channel_id),
        pamqp.frame.marshal(ContentHeader(0, size, props), channel_id),
    ]
    offset = 0
    for chunk in chunks:
        expected.append(pamqp.frame.marshal(ContentBody(body[offset : offset + chunk]), channel_id))
        offset += chunk
    assert data == b"".join(expected)
    assert all(len(frame) <= 4096 for frame in expected)
    described = [describe(v) for _, v in parse(data)]
    assert [d[0] for d in described] == ["Basic.Publish", "ContentHeader"] + ["ContentBody"] * len(
        chunks
    )


def test_publish_mandatory_flag_and_default_properties() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.publish(channel_id, exchange="", routing_key="q", body=b"hi", mandatory=True)
    assert sent(conn) == frames(
        channel_id,
        commands.Basic.Publish(exchange="", routing_key="q", mandatory=True),
        ContentHeader(0, 2, Props()),
        ContentBody(b"hi"),
    )


def test_publish_with_an_unencodable_routing_key() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(ValueError, match="routing key"):
        conn.publish(channel_id, exchange="", routing_key="k" * 300, body=b"x")
    assert conn.bytes_pending() == 0


def test_send_method_frame_larger_than_frame_max() -> None:
    conn = connect(tune=(2047, 4096, 60))
    channel_id = open_channel(conn)
    declare = commands.Queue.Declare(queue="q", arguments={"x-big": "v" * 5000})
    with pytest.raises(ValueError, match="frame_max of 4096"):
        conn.send_method(channel_id, declare)
    assert conn.bytes_pending() == 0
    # Nothing is expected on the channel: a DeclareOk now is unexpected.
    with pytest.raises(RemoteProtocolError, match="no request"):
        conn.receive_data(server(channel_id, commands.Queue.DeclareOk("q", 0, 0)))


def test_ack_nack_reject_frames() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.ack(channel_id, 5)
    conn.ack(channel_id, 9, multiple=True)
    conn.nack(channel_id, 10)
    conn.nack(channel_id, 12, multiple=True, requeue=False)
    conn.reject(channel_id, 13)
    conn.reject(channel_id, 14, requeue=False)
    assert sent(conn) == frames(
        channel_id,
        commands.Basic.Ack(5, False),
        commands.Basic.Ack(9, True),
        commands.Basic.Nack(10, False, True),
        commands.Basic.Nack(12, True, False),
        commands.Basic.Reject(13, True),
        commands.Basic.Reject(14, False),
    )


# Publisher confirms ---------------------------------------------------------------------


def publish_n(conn: ProtocolConnection, channel_id: int, n: int) -> list[int | None]:
    tags = [
        conn.publish(channel_id, exchange="", routing_key="q", body=str(i).encode())
        for i in range(n)
    ]
    conn.data_to_send()
    return tags


def test_confirm_mode_numbers_publishes_from_one() -> None:
    conn = connect()
    plain = open_channel(conn)
    confirmed = confirm_channel(conn)
    assert publish_n(conn, plain, 2) == [None, None]
    assert publish_n(conn, confirmed, 3) == [1, 2, 3]
    events = conn.receive_data(server(confirmed, commands.Confirm.SelectOk()))
    assert norm(events) == [("MethodReceived", confirmed, describe(commands.Confirm.SelectOk()))]
    assert publish_n(conn, confirmed, 1) == [4]


def test_single_confirms_in_any_order() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish_n(conn, channel_id, 3)
    assert conn.receive_data(server(channel_id, commands.Basic.Ack(2))) == [
        PublishConfirmed(channel_id, (2,), True)
    ]
    assert conn.receive_data(server(channel_id, commands.Basic.Ack(1))) == [
        PublishConfirmed(channel_id, (1,), True)
    ]
    with pytest.raises(RemoteProtocolError, match="publish tag 2 on channel 1, which is not"):
        conn.receive_data(server(channel_id, commands.Basic.Ack(2)))


def test_multiple_confirms_skip_what_was_already_confirmed() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish_n(conn, channel_id, 5)
    assert conn.receive_data(server(channel_id, commands.Basic.Ack(2))) == [
        PublishConfirmed(channel_id, (2,), True)
    ]
    assert conn.receive_data(server(channel_id, commands.Basic.Ack(4, multiple=True))) == [
        PublishConfirmed(channel_id, (1, 3, 4), True)
    ]
    assert conn.receive_data(server(channel_id, commands.Basic.Ack(5))) == [
        PublishConfirmed(channel_id, (5,), True)
    ]


def test_multiple_with_tag_zero_confirms_everything_outstanding() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish_n(conn, channel_id, 4)
    conn.receive_data(server(channel_id, commands.Basic.Ack(3)))
    assert conn.receive_data(server(channel_id, commands.Basic.Ack(0, multiple=True))) == [
        PublishConfirmed(channel_id, (1, 2, 4), True)
    ]
    with pytest.raises(RemoteProtocolError, match="no publish up to it"):
        conn.receive_data(server(channel_id, commands.Basic.Ack(0, multiple=True)))


def test_nacks() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish_n(conn, channel_id, 3)
    data = server(
        channel_id, commands.Basic.Nack(1, requeue=False), commands.Basic.Nack(3, multiple=True)
    )
    assert conn.receive_data(data) == [
        PublishConfirmed(channel_id, (1,), False),
        PublishConfirmed(channel_id, (2, 3), False),
    ]


def test_multiple_confirm_with_nothing_outstanding_below_it() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish_n(conn, channel_id, 3)
    conn.receive_data(server(channel_id, commands.Basic.Ack(2, multiple=True)))
    with pytest.raises(
        RemoteProtocolError, match=re.escape("Basic.Nack (multiple) for publish tag 2")
    ):
        conn.receive_data(server(channel_id, commands.Basic.Nack(2, multiple=True)))


def test_confirm_of_a_tag_never_published() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish_n(conn, channel_id, 1)
    with pytest.raises(RemoteProtocolError, match="publish tag 9"):
        conn.receive_data(server(channel_id, commands.Basic.Ack(9)))


def test_confirm_on_a_channel_not_in_confirm_mode() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    publish_n(conn, channel_id, 1)
    with pytest.raises(RemoteProtocolError, match="not in confirm mode"):
        conn.receive_data(server(channel_id, commands.Basic.Ack(1)))


def test_confirm_select_nowait_expects_no_reply() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.send_method(channel_id, commands.Confirm.Select(nowait=True))
    assert publish_n(conn, channel_id, 1) == [1]
    with pytest.raises(
        RemoteProtocolError, match=re.escape("Confirm.SelectOk on channel 1, but no request")
    ):
        conn.receive_data(server(channel_id, commands.Confirm.SelectOk()))


# Returns --------------------------------------------------------------------------------


def returned(channel_id: int, exchange: str, routing_key: str, body: bytes) -> bytes:
    method = commands.Basic.Return(312, "NO_ROUTE", exchange, routing_key)
    return server_content(channel_id, method, body, Props(message_id="r"))


def test_returns_are_matched_to_publish_tags_in_publish_order() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish = conn.publish
    assert publish(channel_id, exchange="ex", routing_key="a", body=b"1", mandatory=True) == 1
    assert publish(channel_id, exchange="ex", routing_key="a", body=b"1") == 2  # not mandatory
    assert publish(channel_id, exchange="ex", routing_key="b", body=b"1", mandatory=True) == 3
    assert publish(channel_id, exchange="ex", routing_key="a", body=b"1", mandatory=True) == 4
    assert publish(channel_id, exchange="", routing_key="a", body=b"1", mandatory=True) == 5
    conn.data_to_send()

    def one(data: bytes) -> Returned:
        [event] = conn.receive_data(data)
        assert isinstance(event, Returned)
        return event

    first = one(returned(channel_id, "ex", "a", b"1"))
    assert first == Returned(channel_id, 1, 312, "NO_ROUTE", "ex", "a", Props(message_id="r"), b"1")
    assert one(returned(channel_id, "ex", "a", b"1")).publish_tag == 4
    assert one(returned(channel_id, "ex", "a", b"1")).publish_tag is None  # nothing left
    assert one(returned(channel_id, "ex", "b", b"2")).publish_tag is None  # body differs
    assert one(returned(channel_id, "", "a", b"1")).publish_tag == 5
    assert one(returned(channel_id, "ex", "b", b"1")).publish_tag == 3


def test_a_confirmed_publish_is_no_longer_returnable() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    conn.publish(channel_id, exchange="", routing_key="q", body=b"x", mandatory=True)
    conn.publish(channel_id, exchange="", routing_key="q", body=b"x", mandatory=True)
    conn.receive_data(server(channel_id, commands.Basic.Ack(1)))
    [event] = conn.receive_data(returned(channel_id, "", "q", b"x"))
    assert isinstance(event, Returned)
    assert event.publish_tag == 2


def test_return_outside_confirm_mode_has_no_publish_tag() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    assert conn.publish(channel_id, exchange="", routing_key="q", body=b"x", mandatory=True) is None
    assert conn.receive_data(returned(channel_id, "", "q", b"x")) == [
        Returned(channel_id, None, 312, "NO_ROUTE", "", "q", Props(message_id="r"), b"x")
    ]


# Channels -------------------------------------------------------------------------------


def test_channels_get_the_lowest_free_id() -> None:
    conn = connect()
    assert conn.open_channel() == 1
    assert conn.open_channel() == 2
    assert conn.channel_state(1) is ChannelState.OPENING
    assert sent(conn) == frames(1, commands.Channel.Open()) + frames(2, commands.Channel.Open())
    data = server(2, commands.Channel.OpenOk()) + server(1, commands.Channel.OpenOk())
    assert conn.receive_data(data) == [ChannelOpened(2), ChannelOpened(1)]
    assert conn.channel_state(1) is ChannelState.OPEN


def test_client_closes_a_channel_and_drops_its_frames_meanwhile() -> None:
    conn = connect()
    one = open_channel(conn)
    two = open_channel(conn)
    conn.receive_data(server(one, commands.Basic.Deliver("ctag", 1, False, "", "q")))
    conn.close_channel(one, 200, "bye")
    assert sent(conn) == frames(one, commands.Channel.Close(200, "bye", 0, 0))
    assert conn.channel_state(one) is ChannelState.CLOSING
    conn.close_channel(one)  # already closing: nothing more
    assert conn.data_to_send() == b""
    # What the broker sent before it saw our close is dropped, even mid-content.
    dropped = b"".join(
        [
            server(one, ContentHeader(0, 3, Props()), ContentBody(b"abc")),
            server_content(one, commands.Basic.Deliver("ctag", 2, False, "", "q"), b"zz"),
            server(one, commands.Basic.QosOk(), commands.Basic.Ack(1)),
        ]
    )
    assert conn.receive_data(dropped) == []
    events = conn.receive_data(server(one, commands.Channel.CloseOk()))
    assert events == [ChannelCloseCompleted(one)]
    assert conn.channel_state(one) is None
    assert conn.data_to_send() == b""
    assert conn.open_channel() == one  # the id is free again
    assert conn.channel_state(two) is ChannelState.OPEN


def test_client_closes_an_opening_channel() -> None:
    conn = connect()
    channel_id = conn.open_channel()
    conn.close_channel(channel_id)
    conn.data_to_send()
    assert conn.receive_data(server(channel_id, commands.Channel.OpenOk())) == []
    assert conn.receive_data(server(channel_id, commands.Channel.CloseOk())) == [
        ChannelCloseCompleted(channel_id)
    ]


def test_broker_closes_a_channel() -> None:
    conn = connect()
    channel_id = confirm_channel(conn)
    publish_n(conn, channel_id, 2)
    text = "NOT_FOUND - no queue 'q' in vhost '/'"
    events = conn.receive_data(server(channel_id, commands.Channel.Close(404, text, 60, 20)))
    assert events == [ChannelClosedByBroker(channel_id, 404, text, 60, 20)]
    assert sent(conn) == frames(channel_id, commands.Channel.CloseOk())
    assert conn.channel_state(channel_id) is None
    with pytest.raises(RemoteProtocolError, match="channel 1, which is not open"):
        conn.receive_data(server(channel_id, commands.Basic.Ack(1)))


def test_channel_id_is_reused_after_the_broker_closed_it() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.receive_data(server(channel_id, commands.Channel.Close(406, "x", 0, 0)))
    conn.data_to_send()
    assert open_channel(conn) == channel_id


def test_broker_closes_an_opening_channel() -> None:
    conn = connect()
    channel_id = conn.open_channel()
    conn.data_to_send()
    events = conn.receive_data(server(channel_id, commands.Channel.Close(530, "no", 20, 10)))
    assert events == [ChannelClosedByBroker(channel_id, 530, "no", 20, 10)]
    assert sent(conn) == frames(channel_id, commands.Channel.CloseOk())


def test_crossed_channel_close_keeps_the_id_until_the_brokers_close_ok() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.close_channel(channel_id)
    conn.data_to_send()
    events = conn.receive_data(server(channel_id, commands.Channel.Close(406, "x", 60, 80)))
    assert events == [ChannelCloseCompleted(channel_id)]
    assert sent(conn) == frames(channel_id, commands.Channel.CloseOk())
    assert conn.channel_state(channel_id) is None
    # RabbitMQ still answers our channel.close: the id stays reserved until then.
    assert conn.open_channel() == 2
    conn.data_to_send()
    assert conn.receive_data(server(channel_id, commands.Channel.CloseOk())) == []
    assert conn.data_to_send() == b""
    assert conn.open_channel() == channel_id


def test_frames_on_an_opening_channel() -> None:
    conn = connect()
    channel_id = conn.open_channel()
    with pytest.raises(RemoteProtocolError, match=re.escape("before channel.open-ok")):
        conn.receive_data(server(channel_id, commands.Basic.Deliver("c", 1, False, "", "q")))


def test_open_ok_on_an_open_channel() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(
        RemoteProtocolError, match=re.escape("Channel.OpenOk on channel 1, but no request")
    ):
        conn.receive_data(server(channel_id, commands.Channel.OpenOk()))


def test_channel_max_exhaustion() -> None:
    conn = connect(tune=(3, 131072, 60))
    assert [conn.open_channel() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(LocalProtocolError, match="all 3 channels"):
        conn.open_channel()
    conn.data_to_send()
    conn.receive_data(server(2, commands.Channel.OpenOk()))
    conn.receive_data(server(2, commands.Channel.Close(406, "x", 0, 0)))
    assert conn.open_channel() == 2


def test_replies_must_match_the_requests_in_order() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.send_method(channel_id, commands.Basic.Qos(prefetch_count=5))
    conn.send_method(channel_id, commands.Queue.Declare(queue="q", durable=True))
    conn.send_method(channel_id, commands.Queue.Bind(queue="q", exchange="ex", routing_key="k"))
    assert sent(conn) == frames(
        channel_id,
        commands.Basic.Qos(prefetch_count=5),
        commands.Queue.Declare(queue="q", durable=True),
        commands.Queue.Bind(queue="q", exchange="ex", routing_key="k"),
    )
    events = conn.receive_data(
        server(channel_id, commands.Basic.QosOk(), commands.Queue.DeclareOk("q", 4, 1))
    )
    assert norm(events) == [
        ("MethodReceived", channel_id, describe(commands.Basic.QosOk())),
        ("MethodReceived", channel_id, describe(commands.Queue.DeclareOk("q", 4, 1))),
    ]
    assert isinstance(events[1], MethodReceived)
    declare_ok = events[1].method
    assert isinstance(declare_ok, commands.Queue.DeclareOk)
    assert (declare_ok.message_count, declare_ok.consumer_count) == (4, 1)
    with pytest.raises(
        RemoteProtocolError, match=re.escape("Queue.UnbindOk on channel 1 in reply to Queue.Bind")
    ):
        conn.receive_data(server(channel_id, commands.Queue.UnbindOk()))


def test_nowait_methods_expect_no_reply() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.send_method(channel_id, commands.Queue.Declare(queue="q", nowait=True))
    conn.send_method(channel_id, commands.Basic.Consume(queue="q", consumer_tag="t", nowait=True))
    conn.send_method(channel_id, commands.Basic.Qos(prefetch_count=1))
    events = conn.receive_data(server(channel_id, commands.Basic.QosOk()))
    assert norm(events) == [("MethodReceived", channel_id, describe(commands.Basic.QosOk()))]


def test_consume_and_cancel_replies() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.send_method(channel_id, commands.Basic.Consume(queue="q", consumer_tag="t"))
    conn.send_method(channel_id, commands.Basic.Cancel("t"))
    conn.send_method(channel_id, commands.Basic.Recover(requeue=True))
    conn.send_method(channel_id, commands.Channel.Flow(active=False))
    data = server(
        channel_id,
        commands.Basic.ConsumeOk("t"),
        commands.Basic.CancelOk("t"),
        commands.Basic.RecoverOk(),
        commands.Channel.FlowOk(active=False),
    )
    assert [name for _, (name, _) in norm_methods(conn.receive_data(data))] == [
        "Basic.ConsumeOk",
        "Basic.CancelOk",
        "Basic.RecoverOk",
        "Channel.FlowOk",
    ]


def norm_methods(events: list[Event]) -> list[tuple[int, tuple[str, dict[str, object]]]]:
    out: list[tuple[int, tuple[str, dict[str, object]]]] = []
    for event in events:
        assert isinstance(event, MethodReceived)
        out.append((event.channel_id, (event.method.name, dict(event.method))))
    return out


def test_broker_channel_flow_is_answered() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    assert conn.receive_data(server(channel_id, commands.Channel.Flow(active=False))) == [
        ChannelFlow(channel_id, False)
    ]
    assert sent(conn) == frames(channel_id, commands.Channel.FlowOk(active=False))
    assert conn.receive_data(server(channel_id, commands.Channel.Flow(active=True))) == [
        ChannelFlow(channel_id, True)
    ]
    assert sent(conn) == frames(channel_id, commands.Channel.FlowOk(active=True))


@pytest.mark.parametrize("nowait", [False, True])
def test_broker_cancels_a_consumer(nowait: bool) -> None:
    conn = connect()
    channel_id = open_channel(conn)
    events = conn.receive_data(server(channel_id, commands.Basic.Cancel("ctag-1", nowait=nowait)))
    assert events == [ConsumerCancelledByBroker(channel_id, "ctag-1")]
    expected = [] if nowait else frames(channel_id, commands.Basic.CancelOk("ctag-1"))
    assert sent(conn) == expected


def test_blocked_and_unblocked() -> None:
    conn = connect()
    data = server(0, commands.Connection.Blocked("low on memory"), commands.Connection.Unblocked())
    assert conn.receive_data(data) == [ConnectionBlocked("low on memory"), ConnectionUnblocked()]
    assert conn.data_to_send() == b""


# Closing the connection -----------------------------------------------------------------


def test_client_closes_the_connection_and_drops_frames_meanwhile() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    conn.close(200, "shutdown")
    assert state_of(conn) is ConnectionState.CLOSING
    assert sent(conn) == frames(0, commands.Connection.Close(200, "shutdown", 0, 0))
    conn.close()  # no-op
    assert conn.data_to_send() == b""
    dropped = b"".join(
        [
            server_content(channel_id, commands.Basic.Deliver("c", 1, False, "", "q"), b"x"),
            server(channel_id, commands.Channel.Close(404, "x", 0, 0)),
            server(0, Heartbeat(), commands.Connection.Blocked("x")),
            server(9, ContentBody(b"for a channel that never existed")),
        ]
    )
    assert conn.receive_data(dropped) == []
    assert conn.data_to_send() == b""
    assert conn.receive_data(server(0, commands.Connection.CloseOk())) == [
        ConnectionCloseCompleted()
    ]
    assert state_of(conn) is ConnectionState.CLOSED
    assert conn.channel_state(channel_id) is None
    conn.close()  # no-op
    assert conn.data_to_send() == b""
    assert conn.receive_data(b"anything after the end") == []


def test_closes_cross() -> None:
    conn = connect()
    conn.close()
    conn.data_to_send()
    events = conn.receive_data(server(0, commands.Connection.Close(320, "FORCED", 0, 0)))
    assert events == [ConnectionClosedByBroker(320, "FORCED", 0, 0)]
    assert sent(conn) == frames(0, commands.Connection.CloseOk())
    assert state_of(conn) is ConnectionState.CLOSED


def test_broker_closes_an_open_connection() -> None:
    conn = connect()
    channel_id = open_channel(conn)
    text = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    data = server(0, commands.Connection.Close(320, text, 0, 0)) + server(
        channel_id, commands.Basic.QosOk()
    )
    assert conn.receive_data(data) == [ConnectionClosedByBroker(320, text, 0, 0)]
    assert sent(conn) == frames(0, commands.Connection.CloseOk())
    assert conn.channel_state(channel_id) is None
    with pytest.raises(LocalProtocolError, match="connection is closed"):
        conn.open_channel()


@pytest.mark.parametrize("feed", [0, 1, 2])
def test_close_before_the_broker_tuned_the_connection_sends_nothing(feed: int) -> None:
    conn = new_connection()
    if feed:
        conn.initiate()
        conn.data_to_send()
    if feed == 2:
        conn.receive_data(start_frame())
        conn.data_to_send()
    conn.close()
    assert state_of(conn) is ConnectionState.CLOSED
    assert conn.data_to_send() == b""


def test_close_while_awaiting_open_ok_sends_close() -> None:
    conn = new_connection()
    conn.initiate()
    conn.receive_data(start_frame())
    conn.receive_data(tune_frame())
    conn.data_to_send()
    conn.close()
    assert state_of(conn) is ConnectionState.CLOSING
    assert sent(conn) == frames(0, commands.Connection.Close(200, "", 0, 0))
    assert conn.receive_data(server(0, commands.Connection.OpenOk())) == []
    assert conn.receive_data(server(0, commands.Connection.CloseOk())) == [
        ConnectionCloseCompleted()
    ]


# Local errors ---------------------------------------------------------------------------


def in_state(state: ConnectionState) -> ProtocolConnection:
    conn = new_connection()
    if state is ConnectionState.INITIAL:
        return conn
    conn.initiate()
    if state is ConnectionState.AWAIT_START:
        return conn
    conn.receive_data(start_frame())
    if state is ConnectionState.AWAIT_TUNE:
        return conn
    conn.receive_data(tune_frame())
    if state is ConnectionState.AWAIT_OPEN_OK:
        return conn
    conn.receive_data(server(0, commands.Connection.OpenOk()))
    if state is ConnectionState.CLOSING:
        conn.close()
    elif state is ConnectionState.CLOSED:
        conn.close()
        conn.receive_data(server(0, commands.Connection.CloseOk()))
    assert conn.state is state
    return conn


CHANNEL_CALLS: dict[str, Any] = {
    "open_channel": lambda c: c.open_channel(),
    "close_channel": lambda c: c.close_channel(1),
    "send_method": lambda c: c.send_method(1, commands.Basic.Qos(prefetch_count=1)),
    "publish": lambda c: c.publish(1, exchange="", routing_key="q", body=b"x"),
    "ack": lambda c: c.ack(1, 1),
    "nack": lambda c: c.nack(1, 1),
    "reject": lambda c: c.reject(1, 1),
}


@pytest.mark.parametrize("call", sorted(CHANNEL_CALLS))
@pytest.mark.parametrize(
    "state", [s for s in ConnectionState if s is not ConnectionState.OPEN], ids=lambda s: s.name
)
def test_channel_calls_need_an_open_connection(call: str, state: ConnectionState) -> None:
    conn = in_state(state)
    conn.data_to_send()
    with pytest.raises(LocalProtocolError, match=f"the connection is {state.value}, not open"):
        CHANNEL_CALLS[call](conn)
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("call", sorted(set(CHANNEL_CALLS) - {"open_channel", "close_channel"}))
@pytest.mark.parametrize("channel_state", ["unknown", "opening", "closing"])
def test_channel_calls_need_an_open_channel(call: str, channel_state: str) -> None:
    conn = connect()
    if channel_state != "unknown":
        assert conn.open_channel() == 1
    if channel_state == "closing":
        conn.receive_data(server(1, commands.Channel.OpenOk()))
        conn.close_channel(1)
    conn.data_to_send()
    expected = "it is not open" if channel_state == "unknown" else f"it is {channel_state}"
    with pytest.raises(LocalProtocolError, match=f"on channel 1: {expected}"):
        CHANNEL_CALLS[call](conn)
    assert conn.data_to_send() == b""


def test_close_channel_of_an_unknown_channel() -> None:
    conn = connect()
    with pytest.raises(LocalProtocolError, match="cannot close channel 4: it is not open"):
        conn.close_channel(4)


@pytest.mark.parametrize("tag", [0, -1, 2**64])
@pytest.mark.parametrize("call", ["ack", "nack", "reject"])
def test_delivery_tags_must_be_positive_64_bit(call: str, tag: int) -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(LocalProtocolError, match=f"delivery tag {tag}"):
        getattr(conn, call)(channel_id, tag)
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (commands.Connection.Close(200, "", 0, 0), "connection-class"),
        (commands.Connection.Blocked("x"), "connection-class"),
        (commands.Channel.Open(), "use open_channel()"),
        (commands.Channel.Close(200, "", 0, 0), "use close_channel()"),
        (commands.Basic.Publish(exchange="", routing_key="q"), "use publish()"),
        (commands.Basic.Deliver("c", 1, False, "", "q"), "only a broker sends it"),
        (commands.Queue.DeclareOk("q", 0, 0), "only a broker sends it"),
        (commands.Channel.FlowOk(True), "only a broker sends it"),
        (commands.Basic.CancelOk("c"), "only a broker sends it"),
    ],
    ids=lambda v: v.name if isinstance(v, Frame) else "",
)
def test_send_method_refuses_methods_with_a_dedicated_path(method: Frame, message: str) -> None:
    conn = connect()
    channel_id = open_channel(conn)
    with pytest.raises(LocalProtocolError, match=message):
        conn.send_method(channel_id, method)
    assert conn.data_to_send() == b""


def test_initiate_twice() -> None:
    conn = new_connection()
    conn.initiate()
    with pytest.raises(LocalProtocolError, match="only be called once"):
        conn.initiate()
    assert conn.data_to_send() == PROTOCOL_HEADER


@pytest.mark.parametrize("state", [ConnectionState.INITIAL, ConnectionState.AWAIT_TUNE])
def test_heartbeat_before_tune_is_a_local_error(state: ConnectionState) -> None:
    conn = in_state(state)
    conn.data_to_send()
    with pytest.raises(LocalProtocolError, match="cannot send a heartbeat"):
        conn.send_heartbeat()
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"auth_mechanism": "AMQPLAIN"}, "auth_mechanism"),
        ({"credentials": None}, "needs credentials"),
        ({"channel_max": 0}, "channel_max"),
        ({"channel_max": 65536}, "channel_max"),
        ({"frame_max": 1024}, "frame_max"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"heartbeat": 70000}, "heartbeat"),
        ({"client_properties": {"bad": object()}}, "client_properties"),
    ],
)
def test_constructor_validates_its_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        new_connection(**kwargs)


def test_credentials_never_show_the_password() -> None:
    credentials = Credentials("guest", "hunter2")
    assert "hunter2" not in repr(credentials)
    assert "guest" in repr(credentials)
