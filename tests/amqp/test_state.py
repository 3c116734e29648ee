"""The state tables, expected replies and tune negotiation on their own."""

from __future__ import annotations

import pytest
from pamqp import commands

from strictconsume.amqp import _handshake, _receive
from strictconsume.amqp._errors import RemoteProtocolError
from strictconsume.amqp._state import (
    BROKER_ONLY_NAMES,
    CHANNEL_METHODS,
    CONNECTION_TRANSITIONS,
    REPLY_NAMES,
    ChannelRecord,
    ChannelState,
    ConnectionState,
    expect_reply,
    negotiate_tune,
)


def test_the_handshake_table_walks_start_tune_open_ok_to_open() -> None:
    state = ConnectionState.AWAIT_START
    for method in (commands.Connection.Start, commands.Connection.Tune, commands.Connection.OpenOk):
        _, state = CONNECTION_TRANSITIONS[(state, method)]
    assert state is ConnectionState.OPEN
    assert (ConnectionState.OPEN, commands.Connection.Start) not in CONNECTION_TRANSITIONS


def test_every_handler_the_tables_name_exists_where_it_is_resolved() -> None:
    """Connection-class handlers live in ``_handshake``, channel ones in ``_receive``."""
    names = {name for name, _ in CONNECTION_TRANSITIONS.values()}
    assert all(callable(getattr(_handshake, name, None)) for name in names), names
    names = set(CHANNEL_METHODS.values())
    assert all(callable(getattr(_receive, name, None)) for name in names), names


def test_replies_and_broker_only_methods() -> None:
    assert {"Queue.DeclareOk", "Basic.ConsumeOk", "Channel.OpenOk"} <= REPLY_NAMES
    assert "Queue.Declare" not in REPLY_NAMES
    assert {"Basic.Deliver", "Basic.Return"} == BROKER_ONLY_NAMES - REPLY_NAMES


def test_replies_must_come_in_request_order() -> None:
    channel = ChannelRecord(channel_id=3, state=ChannelState.OPEN)
    channel.expected.append(("Queue.Declare", ("Queue.DeclareOk",)))
    channel.expected.append(("Basic.Qos", ("Basic.QosOk",)))
    with pytest.raises(
        RemoteProtocolError, match=r"Basic\.QosOk on channel 3 in reply to Queue\.Declare"
    ):
        expect_reply(channel, commands.Basic.QosOk())
    expect_reply(channel, commands.Queue.DeclareOk("q", 0, 0))
    expect_reply(channel, commands.Basic.QosOk())
    with pytest.raises(RemoteProtocolError, match="no request on that channel is waiting"):
        expect_reply(channel, commands.Basic.QosOk())


def content_method_of(channel: ChannelRecord) -> object:
    """A call, so that mypy does not narrow the attribute across steps."""
    return channel.content_method


def test_forgetting_a_channel_drops_replies_content_and_confirms() -> None:
    channel = ChannelRecord(channel_id=1, state=ChannelState.OPEN)
    channel.expected.append(("Basic.Qos", ("Basic.QosOk",)))
    channel.confirms.select()
    channel.confirms.published("", "q", b"x", True)
    channel.content_method = commands.Basic.Deliver("c", 1, False, "", "q")
    channel.forget()
    assert not channel.expected
    assert content_method_of(channel) is None
    assert not channel.confirms.unconfirmed
    assert not channel.confirms.returnable


@pytest.mark.parametrize(
    ("ours", "broker", "agreed"),
    [
        ((2047, 131072, None), (0, 0, 60), (2047, 131072, 60)),  # 0: no limit, ours
        ((2047, 131072, None), (100, 8192, 0), (100, 8192, 0)),
        ((70000, 131072, 0), (0, 0, 60), (65535, 131072, 0)),  # 0 disables heartbeats
        ((10, 4096, 30), (2047, 131072, 60), (10, 4096, 30)),
        ((10, 4096, 30), (2047, 131072, 0), (10, 4096, 30)),  # broker 0: ours
        ((10, 4096, 90), (2047, 131072, 60), (10, 4096, 60)),
    ],
)
def test_tune_takes_the_smaller_non_zero_values(
    ours: tuple[int, int, int | None], broker: tuple[int, int, int], agreed: tuple[int, int, int]
) -> None:
    channel_max, frame_max, heartbeat = ours
    tune = commands.Connection.Tune(*broker)
    assert (
        negotiate_tune(tune, channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat)
        == agreed
    )


def test_a_frame_max_below_the_amqp_minimum_is_the_brokers_error() -> None:
    with pytest.raises(RemoteProtocolError, match="frame_max 4095, below the minimum of 4096"):
        negotiate_tune(
            commands.Connection.Tune(0, 4095, 0), channel_max=1, frame_max=4096, heartbeat=None
        )
