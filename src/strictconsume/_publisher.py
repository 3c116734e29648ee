"""Confirmed publishing: the App's publishing channel and :class:`Publisher`.

Each connection of an App has one channel in confirm mode for publishing: retries,
dead letters and ``app.publisher()`` share it. A channel error (a publish to an
exchange that does not exist closes the channel with 404) must not leave the App
without one, so :class:`PublishChannel` opens a fresh channel whenever the current
one was closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from .amqp import ChannelClosed, ConnectionLost, Properties, connect

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from .amqp import Channel, Connection

__all__ = [
    "PublishChannel",
    "PublishChannelSlot",
    "Publisher",
    "build_properties",
    "own_connection_publisher",
]

PERSISTENT = 2
TRANSIENT = 1


def build_properties(
    *,
    headers: Mapping[str, Any] | None,
    message_id: str | None,
    content_type: str | None,
    persistent: bool,
    correlation_id: str | None = None,
    reply_to: str | None = None,
) -> Properties:
    return Properties(
        headers=dict(headers) if headers else None,
        message_id=message_id,
        content_type=content_type,
        correlation_id=correlation_id,
        reply_to=reply_to,
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
    )


def _body(body: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    raise TypeError(f"body must be bytes or str, not {type(body).__name__}")


class PublishChannelGone(ConnectionLost):
    """The connection of a :class:`PublishChannel` ended before a publish started on it
    (so publishing on the App's next connection cannot duplicate anything)."""


class PublishChannel:
    """One confirmed channel of a connection, reopened after a channel error."""

    def __init__(self) -> None:
        self._channel: Channel | None = None
        self._changed = anyio.Event()  # set (and replaced) whenever _channel changes
        self._broken = anyio.Event()
        self._finished = False

    async def run(
        self,
        conn: Connection,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a confirmed channel open on ``conn`` until cancelled."""
        started = False
        try:
            while True:
                async with conn.channel(confirms=True) as ch:
                    self._set(ch)
                    if not started:
                        started = True
                        task_status.started()
                    await self._broken.wait()
                    self._broken = anyio.Event()
        finally:
            self._finished = True
            self._set(None)

    def _set(self, ch: Channel | None) -> None:
        self._channel = ch
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def channel(self) -> Channel:
        """The open publishing channel (waits while it is being reopened).

        Raises:
            PublishChannelGone: the connection ended.
        """
        while True:
            if self._finished:
                raise PublishChannelGone("the connection of the publishing channel ended")
            ch = self._channel
            if ch is not None and ch.is_open:
                return ch
            changed = self._changed
            if ch is not None:
                self._broken.set()
            await changed.wait()

    def _channel_failed(self, ch: Channel) -> None:
        if self._channel is ch:
            self._broken.set()

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Properties | None,
        mandatory: bool,
    ) -> None:
        """Publish and wait for the broker's confirm (see :meth:`Channel.publish`)."""
        ch = await self.channel()
        try:
            await ch.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )
        except ChannelClosed:
            self._channel_failed(ch)
            raise

    async def declare_queue(
        self, queue: str, arguments: FieldTable | None, *, durable: bool
    ) -> None:
        """Declare a queue on the publishing channel (used for on-demand retry queues)."""
        ch = await self.channel()
        try:
            await ch.queue_declare(queue, durable=durable, arguments=arguments)
        except ChannelClosed:
            self._channel_failed(ch)
            raise


class Publisher:
    """Publishes messages and returns once the broker confirmed each one.

    Get one with ``async with app.publisher() as pub``. While the App runs it uses the
    App's connection (waiting while the App reconnects); otherwise the block has a
    connection of its own.
    """

    def __init__(self, source: PublishChannel | PublishChannelSlot) -> None:
        self._source = source

    async def publish(
        self,
        body: bytes | str,
        *,
        routing_key: str,
        exchange: str = "",
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        """Publish ``body`` and wait for the broker's confirm.

        Args:
            body: The message body; a ``str`` is encoded as UTF-8.
            routing_key: The queue name (on the default exchange) or routing key.
            exchange: The exchange; ``""`` is the default exchange.
            headers: Message headers (any AMQP field-table values).
            message_id: The message's id; handlers see it as ``msg.message_id``.
            content_type: For example ``"application/json"``.
            persistent: Ask the broker to write the message to disk (delivery mode 2).
            mandatory: Raise :class:`~strictconsume.amqp.MessageReturned` when no
                queue takes the message, rather than letting the broker drop it.

        Raises:
            MessageReturned: ``mandatory`` is set and the message reached no queue.
            PublishNacked: the broker refused the message.
            ChannelClosed: the broker closed the channel (for example 404, no such
                exchange); the next publish uses a new channel.
            ConnectionLost: the connection broke before the confirm arrived: the
                message may or may not have been taken; publish it again if it must
                arrive (consumers then may see it twice).
        """
        payload = _body(body)
        properties = build_properties(
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            persistent=persistent,
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        source = self._source
        stale: PublishChannel | None = None
        while True:
            if isinstance(source, PublishChannel):
                channel_source = source
            else:
                channel_source = await source.wait(stale=stale)
            try:
                await channel_source.publish(
                    payload,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                )
            except PublishChannelGone:
                # Its connection ended before the message was sent: nothing can be
                # duplicated by sending it on the App's next connection.
                if isinstance(source, PublishChannel):
                    raise
                stale = channel_source
            else:
                return


class PublishChannelSlot:
    """The App's current publishing channel, across reconnects."""

    def __init__(self) -> None:
        self._current: PublishChannel | None = None
        self._changed = anyio.Event()
        self._stopped = True

    def set(self, channel: PublishChannel | None) -> None:
        self._current = channel
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        self.set(None)

    async def wait(self, stale: PublishChannel | None = None) -> PublishChannel:
        """The App's publishing channel (not ``stale``), waiting while it reconnects.

        Raises:
            RuntimeError: the App is not running.
        """
        while True:
            if self._stopped:
                raise RuntimeError(
                    "the App has stopped: publish inside `async with app.running()`, or "
                    "use app.publisher() outside it for a connection of its own"
                )
            current = self._current
            if current is not None and current is not stale:
                return current
            await self._changed.wait()


@contextlib.asynccontextmanager
async def own_connection_publisher(url: str) -> AsyncIterator[Publisher]:
    """A Publisher with a connection of its own (used when the App is not running)."""
    async with connect(url) as conn:
        channel = PublishChannel()
        async with anyio.create_task_group() as tg:
            await tg.start(channel.run, conn)
            try:
                yield Publisher(channel)
            finally:
                tg.cancel_scope.cancel()
