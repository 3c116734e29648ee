"""Connection-class methods on a bare ConnectionRecord, without the facade: the
handlers write the negotiated values into the record, queue their answer and leave
the state to the table."""

from __future__ import annotations

from typing import Any

import attrs
import pamqp.frame
import pytest
from pamqp import commands

from strictconsume.amqp._errors import RemoteProtocolError
from strictconsume.amqp._events import ConnectionClosedByBroker, Credentials
from strictconsume.amqp._framing import PRE_TUNE_FRAME_LIMIT
from strictconsume.amqp._handshake import client_properties, connection_method
from strictconsume.amqp._state import ChannelRecord, ChannelState, ConnectionRecord, ConnectionState
from tests.amqp.test_protocol import describe, parse


def record(state: ConnectionState, **changes: Any) -> ConnectionRecord:
    """A record in ``state``, configured as the facade would by default (``changes``
    replace fields)."""
    conn = ConnectionRecord(
        credentials=Credentials("guest", "secret"),
        vhost="/v",
        auth_mechanism="PLAIN",
        wanted_heartbeat=None,
        locale="en_US",
        client_properties=client_properties(None),
        channel_max=2047,
        frame_max=131072,
        heartbeat=0,
    )
    return attrs.evolve(conn, state=state, **changes)


def queued(conn: ConnectionRecord) -> list[tuple[int, tuple[object, ...]]]:
    data = b"".join(conn.outgoing)
    assert len(data) == conn.outgoing_size
    return [(channel, describe(value)) for channel, value in parse(data)]


def test_client_properties_merge_capabilities_and_replace_the_rest() -> None:
    merged = client_properties({"product": "mine", "capabilities": {"basic.nack": False}})
    assert merged["product"] == "mine"
    capabilities = merged["capabilities"]
    assert isinstance(capabilities, dict)
    assert capabilities["basic.nack"] is False
    assert capabilities["publisher_confirms"] is True
    assert client_properties(None)["product"] == "strictconsume"


def test_start_answers_start_ok_and_the_table_moves_the_state() -> None:
    conn = record(ConnectionState.AWAIT_START)
    start = commands.Connection.Start(
        mechanisms="PLAIN AMQPLAIN", locales="en_US", server_properties={"product": "RabbitMQ"}
    )
    connection_method(conn, start)
    assert conn.state is ConnectionState.AWAIT_TUNE
    assert conn.server_properties == {"product": "RabbitMQ"}
    [(channel, (name, fields))] = queued(conn)
    assert (channel, name) == (0, "Connection.StartOk")
    assert isinstance(fields, dict)
    assert fields["response"] == "\0guest\0secret"


def test_tune_writes_the_negotiated_values_and_the_frame_limit_into_the_record() -> None:
    conn = record(ConnectionState.AWAIT_TUNE, frame_max=65536, wanted_heartbeat=30)
    assert conn.frame_limit == PRE_TUNE_FRAME_LIMIT
    connection_method(conn, commands.Connection.Tune(100, 131072, 60))
    assert conn.state is ConnectionState.AWAIT_OPEN_OK
    assert (conn.channel_max, conn.frame_max, conn.heartbeat) == (100, 65536, 30)
    assert conn.frame_limit == 65536
    assert [name for _, (name, *_) in queued(conn)] == ["Connection.TuneOk", "Connection.Open"]


def test_a_method_outside_the_table_names_the_state_and_changes_nothing() -> None:
    conn = record(ConnectionState.OPEN)
    with pytest.raises(RemoteProtocolError, match=r"Connection\.Tune while the connection is open"):
        connection_method(conn, commands.Connection.Tune(0, 0, 0))
    assert conn.state is ConnectionState.OPEN
    assert conn.outgoing == []


def test_connection_close_in_any_state_answers_and_forgets_every_channel() -> None:
    conn = record(ConnectionState.OPEN)
    conn.channels[1] = ChannelRecord(channel_id=1, state=ChannelState.OPEN)
    conn.draining.add(2)
    connection_method(conn, commands.Connection.Close(320, "CONNECTION_FORCED", 0, 0))
    assert conn.state is ConnectionState.CLOSED
    assert (conn.channels, conn.draining) == ({}, set())
    assert conn.events == [ConnectionClosedByBroker(320, "CONNECTION_FORCED", 0, 0)]
    assert b"".join(conn.outgoing) == pamqp.frame.marshal(commands.Connection.CloseOk(), 0)
