"""The frame loop on a bare ConnectionRecord, without the facade: what it consumes,
where it stops, and what it does with a closed or draining channel."""

from __future__ import annotations

import pytest
from pamqp import commands
from pamqp.body import ContentBody

from strictconsume.amqp._errors import RemoteProtocolError
from strictconsume.amqp._events import (
    ChannelCloseCompleted,
    ChannelOpened,
    ConnectionClosedByBroker,
    HeartbeatReceived,
)
from strictconsume.amqp._receive import parse_frames
from strictconsume.amqp._state import ChannelRecord, ChannelState, ConnectionState
from tests.amqp.test_handshake import record
from tests.amqp.test_protocol import server


def test_only_complete_frames_are_used_and_the_tail_is_left() -> None:
    conn = record(ConnectionState.OPEN)
    heartbeat = bytes.fromhex("08000000000000ce")
    data = heartbeat + heartbeat[:5]
    assert parse_frames(conn, data) == len(heartbeat)
    assert conn.events == [HeartbeatReceived()]
    assert parse_frames(conn, heartbeat[:6]) == 0


def test_it_stops_at_the_frame_that_closes_the_connection_and_uses_everything() -> None:
    conn = record(ConnectionState.OPEN)
    data = server(0, commands.Connection.Close(541, "INTERNAL_ERROR", 0, 0)) + b"\x01garbage"
    assert parse_frames(conn, data) == len(data)
    assert conn.state is ConnectionState.CLOSED
    assert [type(e) for e in conn.events] == [ConnectionClosedByBroker]


def test_a_channel_method_goes_to_its_record() -> None:
    conn = record(ConnectionState.OPEN)
    channel = ChannelRecord(channel_id=3, state=ChannelState.OPENING)
    channel.expected.append(("Channel.Open", ("Channel.OpenOk",)))
    conn.channels[3] = channel
    parse_frames(conn, server(3, commands.Channel.OpenOk()))
    assert channel.state is ChannelState.OPEN
    assert conn.events == [ChannelOpened(3)]


def test_a_draining_id_drops_content_and_is_freed_by_its_close_ok() -> None:
    conn = record(ConnectionState.OPEN)
    conn.draining.add(5)
    data = server(5, ContentBody(b"late")) + server(5, commands.Channel.CloseOk())
    assert parse_frames(conn, data) == len(data)
    assert (conn.events, conn.draining) == ([], set())


def test_crossed_closes_keep_the_id_until_the_brokers_close_ok() -> None:
    conn = record(ConnectionState.OPEN)
    conn.channels[2] = ChannelRecord(channel_id=2, state=ChannelState.CLOSING)
    parse_frames(conn, server(2, commands.Channel.Close(406, "PRECONDITION_FAILED", 0, 0)))
    assert conn.events == [ChannelCloseCompleted(2)]
    assert (conn.channels, conn.draining) == ({}, {2})
    assert b"".join(conn.outgoing) == server(2, commands.Channel.CloseOk())


def test_a_frame_over_the_records_frame_limit_is_refused_from_its_header() -> None:
    conn = record(ConnectionState.OPEN)
    conn.frame_limit = 4096
    header = bytes.fromhex("03000100001000")  # a body frame of 4096 payload bytes
    with pytest.raises(RemoteProtocolError, match="more than the frame limit of 4096"):
        parse_frames(conn, header)
