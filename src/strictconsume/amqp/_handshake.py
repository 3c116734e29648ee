"""Connection-class methods from the broker (channel 0): the handshake, blocked and
unblocked, and connection.close; and the client properties sent in start-ok.

Each handler works on the :class:`ConnectionRecord` the facade owns: it checks what
the broker sent, queues the answer and appends the event. Which handler runs in which
state, and the state after it, is :data:`CONNECTION_TRANSITIONS` of ``_state.py``;
connection.close is accepted in every state and handled before the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias, cast

import pamqp.frame
from pamqp import commands
from pamqp.base import Frame

from ._errors import LocalProtocolError, RemoteProtocolError, UnsupportedSetting
from ._events import (
    ConnectionBlocked,
    ConnectionClosedByBroker,
    ConnectionOpened,
    ConnectionUnblocked,
    server_version,
    text,
)
from ._state import CONNECTION_TRANSITIONS, ConnectionRecord, ConnectionState, negotiate_tune
from ._version import __version__

if TYPE_CHECKING:
    from pamqp.common import FieldTable

__all__ = ["client_properties", "connection_method", "on_connection_close"]

#: RabbitMQ 4.1 refuses a frame_max below 8192 in connection.tune-ok (it closes the
#: socket without a reason); the AMQP minimum of 4096 holds for older brokers.
_RABBITMQ_FRAME_MIN: Final = ((4, 1), 8192)

_DEFAULT_CAPABILITIES: Final[dict[str, object]] = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "exchange_exchange_bindings": True,
    "per_consumer_qos": True,
}


def client_properties(extra: dict[str, object] | None) -> FieldTable:
    """The default client properties (product, version, platform, capabilities) with
    ``extra`` merged over them; a ``capabilities`` table is merged over the default
    capabilities."""
    properties: dict[str, object] = {
        "product": "strictconsume",
        "version": __version__,
        "platform": f"Python {sys.version_info.major}.{sys.version_info.minor}",
        "capabilities": dict(_DEFAULT_CAPABILITIES),
    }
    for key, value in (extra or {}).items():
        current = properties.get(key)
        if key == "capabilities" and isinstance(current, dict) and isinstance(value, dict):
            properties[key] = {**current, **value}
        else:
            properties[key] = value
    return cast("FieldTable", properties)


def connection_method(conn: ConnectionRecord, method: Frame) -> None:
    """Handle a connection-class method the broker sent on channel 0.

    Raises:
        RemoteProtocolError: The method is not one the broker may send in this state.
    """
    state = conn.state
    if isinstance(method, commands.Connection.Close):
        on_connection_close(conn, method)
        return
    transition = _CONNECTION_TRANSITIONS.get((state, type(method)))
    if transition is None:
        raise RemoteProtocolError(
            f"the broker sent {method.name} while the connection is {state.value}"
        )
    handler, after = transition
    handler(conn, method)
    conn.state = after


def on_connection_close(conn: ConnectionRecord, close: commands.Connection.Close) -> None:
    """The broker closes the connection: answer close-ok; the connection is CLOSED."""
    conn.send(pamqp.frame.marshal(commands.Connection.CloseOk(), 0))
    conn.set_closed()
    conn.events.append(
        ConnectionClosedByBroker(
            close.reply_code or 0,
            text(close.reply_text),
            close.class_id or 0,
            close.method_id or 0,
        )
    )


def _on_start(conn: ConnectionRecord, method: Frame) -> None:
    start = cast(commands.Connection.Start, method)
    if (start.version_major, start.version_minor) != (0, 9):
        raise RemoteProtocolError(
            f"the broker proposed AMQP {start.version_major}-{start.version_minor} in "
            "connection.start; strictconsume speaks AMQP 0-9-1"
        )
    offered = text(start.mechanisms).split()
    if conn.auth_mechanism not in offered:
        raise LocalProtocolError(
            f"the broker does not offer the {conn.auth_mechanism} authentication "
            f"mechanism; it offers {' '.join(offered) or 'none'}: configure one of these "
            "(EXTERNAL needs the rabbitmq_auth_mechanism_ssl plugin and a TLS client "
            "certificate)"
        )
    conn.server_properties = dict[str, object](start.server_properties or {})
    version = server_version(conn.server_properties)
    (since, least) = _RABBITMQ_FRAME_MIN
    if version is not None and version[:2] >= since and conn.frame_max < least:
        raise UnsupportedSetting(
            f"frame_max {conn.frame_max} is below {least}, the least RabbitMQ "
            f"{'.'.join(map(str, since))} and later accept (this broker is "
            f"{'.'.join(map(str, version))}): ask for frame_max={least} or more, or "
            "leave frame_max out"
        )
    if conn.auth_mechanism == "PLAIN":
        assert conn.credentials is not None
        response = f"\0{conn.credentials.username}\0{conn.credentials.password}"
    else:
        response = ""
    conn.send(
        pamqp.frame.marshal(
            commands.Connection.StartOk(
                client_properties=conn.client_properties,
                mechanism=conn.auth_mechanism,
                response=response,
                locale=conn.locale,
            ),
            0,
        )
    )


def _on_secure(conn: ConnectionRecord, method: Frame) -> None:
    raise RemoteProtocolError(
        f"the broker sent connection.secure (a SASL challenge), which the "
        f"{conn.auth_mechanism} mechanism does not use"
    )


def _on_tune(conn: ConnectionRecord, method: Frame) -> None:
    channel_max, frame_max, heartbeat = negotiate_tune(
        cast(commands.Connection.Tune, method),
        channel_max=conn.channel_max,
        frame_max=conn.frame_max,
        heartbeat=conn.wanted_heartbeat,
    )
    conn.channel_max = channel_max
    conn.frame_max = frame_max
    conn.frame_limit = frame_max
    conn.heartbeat = heartbeat
    conn.send(
        pamqp.frame.marshal(commands.Connection.TuneOk(conn.channel_max, frame_max, heartbeat), 0)
    )
    conn.send(pamqp.frame.marshal(commands.Connection.Open(virtual_host=conn.vhost), 0))


def _on_open_ok(conn: ConnectionRecord, method: Frame) -> None:
    conn.events.append(
        ConnectionOpened(conn.server_properties, conn.channel_max, conn.frame_max, conn.heartbeat)
    )


def _on_blocked(conn: ConnectionRecord, method: Frame) -> None:
    blocked = cast(commands.Connection.Blocked, method)
    conn.events.append(ConnectionBlocked(text(blocked.reason)))


def _on_unblocked(conn: ConnectionRecord, method: Frame) -> None:
    conn.events.append(ConnectionUnblocked())


_ConnectionHandler: TypeAlias = Callable[[ConnectionRecord, Frame], None]

# The table of ``_state.py`` with its handler names resolved to this module's functions.
_CONNECTION_TRANSITIONS: Final[
    dict[tuple[ConnectionState, type[Frame]], tuple[_ConnectionHandler, ConnectionState]]
] = {key: (globals()[name], after) for key, (name, after) in CONNECTION_TRANSITIONS.items()}
