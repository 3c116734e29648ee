"""What a channel needs from its connection, as one small object.

A :class:`~strictconsume.amqp.Channel` queues frames on the connection's sans-IO core
and asks the connection's writer to send them; it waits while too many bytes are
queued, and fails with the connection's error. That is all it may touch: the
connection hands it a :class:`ConnectionLink` (as httpcore hands a connection its
network stream), so that the channel module does not import the connection module
and never reads the connection's private state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._errors import AMQPError
    from ._protocol import ProtocolConnection

__all__ = ["ConnectionLink"]


@attrs.frozen
class ConnectionLink:
    """A channel's view of its connection.

    Attributes:
        core: The connection's sans-IO core: the channel queues its frames there.
        url: The broker's URL without the password, for error messages.
        error: The connection's error, None while it is usable.
        check_open: Raise the connection's error, or a LocalProtocolError when it is
            not open.
        wake_writer: Ask the writer to send what the core queued.
        send_now: Send what the core queued from the calling task when the writer is
            idle and the socket takes it without waiting; the writer sends the rest.
        wait_writable: Wait while too many bytes are queued for the socket; raise the
            connection's error if it fails meanwhile.
    """

    core: ProtocolConnection
    url: str
    error: Callable[[], AMQPError | None]
    check_open: Callable[[], None]
    wake_writer: Callable[[], None]
    send_now: Callable[[], None]
    wait_writable: Callable[[], Awaitable[None]]
