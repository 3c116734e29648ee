"""The states of a connection and of its channels, the handshake as a table, and the
replies each channel waits for.

Handshake (AMQP 0-9-1 section 2.2.4), driven by the core:

  client                         broker
  protocol header  ----------->
                   <-----------  connection.start    (version 0-9, mechanisms)
  start-ok         ----------->                      (PLAIN "\\0user\\0password")
                   <-----------  connection.tune     (0 means "no limit")
  tune-ok, open    ----------->
                   <-----------  connection.open-ok  -> ConnectionOpened

:data:`CONNECTION_TRANSITIONS` is that life as a table; connection.close is accepted
in every state and handled before it. :data:`CHANNEL_METHODS` lists what the broker
may send on an open channel besides replies. Replies are checked with
:func:`expect_reply` against the requests waiting on their channel, oldest first.
"""

from __future__ import annotations

import collections
import enum
from typing import TYPE_CHECKING, Final, cast

import attrs
from pamqp import commands
from pamqp.base import Frame

from ._confirms import PublishConfirms
from ._content import ContentAssembly
from ._errors import RemoteProtocolError
from ._framing import FRAME_MIN_SIZE, MAX_SHORT, PRE_TUNE_FRAME_LIMIT

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from ._events import Credentials, Event

__all__ = [
    "BROKER_ONLY_NAMES",
    "CHANNEL_CLOSE_INDEX",
    "CHANNEL_CLOSE_OK_INDEX",
    "CHANNEL_METHODS",
    "CONNECTION_CLOSE_INDEX",
    "CONNECTION_CLOSE_OK_INDEX",
    "CONNECTION_TRANSITIONS",
    "DEDICATED_CALLS",
    "REPLY_NAMES",
    "ChannelRecord",
    "ChannelState",
    "ConnectionRecord",
    "ConnectionState",
    "expect_reply",
    "negotiate_tune",
]


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    INITIAL = "initial"
    AWAIT_START = "await_start"
    AWAIT_TUNE = "await_tune"
    AWAIT_OPEN_OK = "await_open_ok"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ChannelState(enum.Enum):
    """Where a channel is in its life; a channel whose close completed is forgotten."""

    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"


# The handshake and the connection's life as a table:
# (state, method the broker sent) -> (the connection's handler, the state after it).
CONNECTION_TRANSITIONS: Final[
    dict[tuple[ConnectionState, type[Frame]], tuple[str, ConnectionState]]
] = {
    (ConnectionState.AWAIT_START, commands.Connection.Start): (
        "_on_start",
        ConnectionState.AWAIT_TUNE,
    ),
    (ConnectionState.AWAIT_TUNE, commands.Connection.Tune): (
        "_on_tune",
        ConnectionState.AWAIT_OPEN_OK,
    ),
    (ConnectionState.AWAIT_TUNE, commands.Connection.Secure): (
        "_on_secure",  # always refused
        ConnectionState.AWAIT_TUNE,
    ),
    (ConnectionState.AWAIT_OPEN_OK, commands.Connection.OpenOk): (
        "_on_open_ok",
        ConnectionState.OPEN,
    ),
    (ConnectionState.OPEN, commands.Connection.Blocked): ("_on_blocked", ConnectionState.OPEN),
    (ConnectionState.OPEN, commands.Connection.Unblocked): ("_on_unblocked", ConnectionState.OPEN),
}

# What the broker may send on an open channel besides replies: method -> handler.
CHANNEL_METHODS: Final[dict[type[Frame], str]] = {
    commands.Basic.Deliver: "_on_content_method",
    commands.Basic.Return: "_on_content_method",
    commands.Basic.GetOk: "_on_get_ok",
    commands.Basic.Ack: "_on_confirm",
    commands.Basic.Nack: "_on_confirm",
    commands.Basic.Cancel: "_on_cancel",
    commands.Channel.OpenOk: "_on_open_ok_channel",
    commands.Channel.Close: "_on_channel_close",
    commands.Channel.Flow: "_on_channel_flow",
}

# Names of every method that answers a synchronous request.
REPLY_NAMES: Final = frozenset(
    name
    for method in cast("dict[int, type[Frame]]", commands.INDEX_MAPPING).values()
    for name in method.valid_responses
)
# Methods only a broker sends; the client must not send them with send_method().
BROKER_ONLY_NAMES: Final = REPLY_NAMES | {"Basic.Deliver", "Basic.Return"}
# Methods with a dedicated call.
DEDICATED_CALLS: Final = {
    "Channel.Open": "open_channel()",
    "Channel.Close": "close_channel()",
    "Basic.Publish": "publish()",
}
CHANNEL_CLOSE_INDEX: Final = commands.Channel.Close.index
CHANNEL_CLOSE_OK_INDEX: Final = commands.Channel.CloseOk.index
CONNECTION_CLOSE_INDEX: Final = commands.Connection.Close.index
CONNECTION_CLOSE_OK_INDEX: Final = commands.Connection.CloseOk.index


@attrs.define(slots=True, eq=False)
class ChannelRecord(ContentAssembly):
    """Everything the core tracks for one channel id: its state, the replies it waits
    for, its publisher confirms and the content being assembled on it."""

    channel_id: int = attrs.field(kw_only=True)
    state: ChannelState = attrs.field(kw_only=True)
    # Synchronous requests awaiting a reply, oldest first: (request name, valid replies).
    expected: collections.deque[tuple[str, tuple[str, ...]]] = attrs.Factory(collections.deque)
    confirms: PublishConfirms = attrs.Factory(PublishConfirms)

    def forget(self) -> None:
        """Drop what a closing channel no longer needs."""
        self.reset_content()
        self.expected.clear()
        self.confirms.forget()


@attrs.define(slots=True, eq=False)
class ConnectionRecord:
    """Everything the core tracks for its connection: what it was configured with,
    its state, what was negotiated, its channels, the output queued for the wire and
    the events of the current :meth:`ProtocolConnection.receive_data` call.

    The facade (``_protocol.py``) owns one; the receiving side (``_receive.py``,
    ``_handshake.py``) works on it.
    """

    # What the handshake sends (checked by the facade).
    credentials: Credentials | None = attrs.field(kw_only=True)
    vhost: str = attrs.field(kw_only=True)
    auth_mechanism: str = attrs.field(kw_only=True)
    wanted_heartbeat: int | None = attrs.field(kw_only=True)
    locale: str = attrs.field(kw_only=True)
    client_properties: FieldTable = attrs.field(kw_only=True)
    # Ours until connection.tune, then the negotiated values.
    channel_max: int = attrs.field(kw_only=True)
    frame_max: int = attrs.field(kw_only=True)
    heartbeat: int = attrs.field(kw_only=True)
    state: ConnectionState = ConnectionState.INITIAL
    server_properties: dict[str, object] = attrs.Factory(dict)
    # The largest frame accepted from the broker: frame_max once tuned.
    frame_limit: int = PRE_TUNE_FRAME_LIMIT
    channels: dict[int, ChannelRecord] = attrs.Factory(dict)
    # Ids whose close crossed the broker's: reserved until its close-ok arrives.
    draining: set[int] = attrs.Factory(set)
    outgoing: list[bytes | memoryview] = attrs.Factory(list)
    outgoing_size: int = 0
    events: list[Event] = attrs.Factory(list)

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the wire."""
        self.outgoing.append(data)
        self.outgoing_size += len(data)

    def set_closed(self) -> None:
        """The connection is CLOSED: every channel and reserved id is forgotten."""
        self.state = ConnectionState.CLOSED
        self.channels.clear()
        self.draining.clear()


def expect_reply(channel: ChannelRecord, method: Frame) -> None:
    """Check that ``method`` answers the oldest request waiting on ``channel``.

    Raises:
        RemoteProtocolError: No request waits, or ``method`` is not a reply to it.
    """
    name = method.name
    expected = channel.expected
    if not expected:
        raise RemoteProtocolError(
            f"the broker sent {name} on channel {channel.channel_id}, but no request "
            "on that channel is waiting for a reply"
        )
    request, replies = expected[0]
    if name not in replies:
        raise RemoteProtocolError(
            f"the broker sent {name} on channel {channel.channel_id} in reply to "
            f"{request}, which expects {' or '.join(replies)}"
        )
    expected.popleft()


def negotiate_tune(
    tune: commands.Connection.Tune,
    *,
    channel_max: int,
    frame_max: int,
    heartbeat: int | None,
) -> tuple[int, int, int]:
    """The values to answer connection.tune with: (channel_max, frame_max, heartbeat).

    channel_max and frame_max are the smaller of the two non-zero values (a zero
    from the broker means no limit, so ours is used); channel_max is capped at
    65535. Heartbeat: ours None takes the broker's value; ours 0 disables
    heartbeats; ours n takes min(n, broker) or n when the broker proposes 0.

    Raises:
        RemoteProtocolError: The broker proposed a frame_max below the AMQP minimum.
    """
    broker_channel_max = tune.channel_max
    broker_frame_max = tune.frame_max
    broker_heartbeat = tune.heartbeat
    if broker_frame_max and broker_frame_max < FRAME_MIN_SIZE:
        raise RemoteProtocolError(
            f"the broker proposed frame_max {broker_frame_max}, below the minimum of "
            f"{FRAME_MIN_SIZE} every AMQP peer must accept"
        )
    if broker_channel_max:
        channel_max = min(channel_max, broker_channel_max)
    if broker_frame_max:
        frame_max = min(frame_max, broker_frame_max)
    if heartbeat is None:
        negotiated = broker_heartbeat
    elif heartbeat == 0 or broker_heartbeat == 0:
        negotiated = heartbeat
    else:
        negotiated = min(heartbeat, broker_heartbeat)
    return min(channel_max, MAX_SHORT), frame_max, negotiated
