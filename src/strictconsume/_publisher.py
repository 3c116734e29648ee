"""Confirmed publishing: the App's publishing connection and :class:`Publisher`.

An App publishes (retry and dead-letter copies, ``app.publisher()``) on a connection
of its own, apart from the one its consumers ack on, as RabbitMQ advises: in a
memory or disk alarm the broker stops reading from every connection that publishes,
and acks queued behind a blocked publish would wait with it. The publishing
connection is opened when something first publishes, cycles through the App's URLs
and is opened again (with backoff) when it is lost and needed.

It has two confirmed channels: one for the framework's copies and one for the
user's publishes, so that a user's publish that closes its channel (404, no such
exchange) never fails a copy in flight. :class:`PublishChannel` opens a fresh
channel whenever its current one was closed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc

from ._request import request
from .amqp import AMQPError, ChannelClosed, ConnectionLost, Flag, Properties, connect

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from ._message import Message
    from .amqp import Channel, Connection, ConnectionParameters

__all__ = [
    "COPIES",
    "USER",
    "PublishChannel",
    "PublishChannelSlot",
    "Publisher",
    "build_properties",
    "own_connection_publisher",
]

PERSISTENT = 2
TRANSIENT = 1

Purpose = Literal["copies", "user"]
#: The channel of the framework's retry and dead-letter copies.
COPIES: Purpose = "copies"
#: The channel of ``app.publisher()``.
USER: Purpose = "user"


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
        self._connection: Connection | None = None
        self._changed = Flag()  # pulsed whenever _channel changes
        self._broken = Flag()
        self._finished = False

    async def run(
        self,
        conn: Connection,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a confirmed channel open on ``conn`` until cancelled."""
        self._connection = conn
        started = False
        try:
            while True:
                # Cleared per channel before the channel is published: whoever saw an
                # earlier channel fail can only break that one.
                broken = self._broken
                broken.clear()
                async with conn.channel(confirms=True) as ch:
                    self._set(ch)
                    if not started:
                        started = True
                        task_status.started()
                    await broken.wait()
                    self._set(None)  # being replaced: callers wait for the next one
        finally:
            self._finished = True
            self._set(None)

    async def connection(self) -> Connection:
        """The connection of the open publishing channel (waits as :meth:`channel`).

        Raises:
            PublishChannelGone: the connection ended.
        """
        await self.channel()
        assert self._connection is not None
        return self._connection

    def _set(self, ch: Channel | None) -> None:
        self._channel = ch
        self._changed.pulse()

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
            changed = self._changed.watch()
            if ch is not None:
                self._channel_failed(ch)
            await changed()

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
        if isinstance(source, PublishChannel):
            await source.publish(
                payload,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )
        else:
            await source.publish(
                payload,
                purpose=USER,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )

    async def request(
        self,
        body: bytes | str,
        *,
        routing_key: str,
        exchange: str = "",
        timeout: float = 30.0,  # noqa: ASYNC109 (the reply's, part of the call)
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        correlation_id: str | None = None,
    ) -> Message:
        """Send a request and wait for its reply (RPC over RabbitMQ's direct reply-to).

        The request is published (confirmed, mandatory, transient) with ``reply_to``
        set to ``amq.rabbitmq.reply-to`` and a ``correlation_id`` (a new uuid unless
        given); a strictconsume handler of ``routing_key`` replies with its return
        value. Replies are not persisted; a reply that comes after ``timeout`` is
        dropped by the broker.

        Returns:
            The reply, as a :class:`Message` (``body``, ``json()``, ``content_type``).

        Raises:
            TimeoutError: no reply within ``timeout`` seconds.
            MessageReturned: no queue took the request.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        properties = build_properties(
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            persistent=False,
            correlation_id=correlation_id or uuid.uuid4().hex,
        )
        source = self._source
        if not isinstance(source, PublishChannel):
            source = await source.wait(purpose=USER)
        return await request(
            await source.connection(),
            _body(body),
            routing_key=routing_key,
            exchange=exchange,
            properties=properties,
            timeout=timeout,
        )


class PublishChannelSlot:
    """The App's publishing channels (one per :data:`Purpose`), across reconnects of
    its publishing connection.

    Whoever waits for a channel asks for the connection (:meth:`wait_wanted`), so it
    is opened only when something publishes.
    """

    def __init__(self) -> None:
        self._current: Mapping[Purpose, PublishChannel] | None = None
        self._changed = Flag()
        self._wanted = Flag()
        self._stopped = True

    def set(self, channels: Mapping[Purpose, PublishChannel] | None) -> None:
        self._current = channels
        self._changed.pulse()

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        self.set(None)

    async def wait_wanted(self) -> None:
        """Return once someone waits for a publishing channel."""
        await self._wanted.take()

    async def wait(
        self, stale: PublishChannel | None = None, *, purpose: Purpose = USER
    ) -> PublishChannel:
        """The App's publishing channel for ``purpose`` (not ``stale``), waiting while
        its connection is (re)opened.

        Raises:
            RuntimeError: the App is not running.
        """
        while True:
            if self._stopped:
                raise RuntimeError(
                    "the App has stopped: publish inside `async with app.running()`, or "
                    "use app.publisher() outside it for a connection of its own"
                )
            current = self._current[purpose] if self._current is not None else None
            if current is not None and current is not stale:
                return current
            changed = self._changed.watch()
            self._wanted.set()
            await changed()

    async def publish(
        self,
        body: bytes,
        *,
        purpose: Purpose,
        exchange: str,
        routing_key: str,
        properties: Properties | None,
        mandatory: bool,
    ) -> None:
        """Publish on the channel for ``purpose`` and wait for the broker's confirm.

        A message whose connection ended before it was sent goes out on the next
        publishing connection (nothing can be duplicated by that).
        """
        stale: PublishChannel | None = None
        while True:
            channel = await self.wait(stale, purpose=purpose)
            try:
                await channel.publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                )
            except PublishChannelGone:
                stale = channel
            else:
                return

    async def declare_queue(
        self, queue: str, arguments: FieldTable | None, *, durable: bool, purpose: Purpose
    ) -> None:
        """Declare a queue on the publishing channel for ``purpose``."""
        stale: PublishChannel | None = None
        while True:
            channel = await self.wait(stale, purpose=purpose)
            try:
                await channel.declare_queue(queue, arguments, durable=durable)
            except PublishChannelGone:
                stale = channel
            else:
                return

    async def serve(self, conn: Connection, *, until: anyio.Event) -> None:
        """Keep the publishing channels open on ``conn``, available to :meth:`wait`,
        until ``until`` is set (then close them) or the connection ends."""
        channels: dict[Purpose, PublishChannel] = {COPIES: PublishChannel(), USER: PublishChannel()}
        try:
            async with anyio.create_task_group() as tg:
                for channel in channels.values():
                    await tg.start(channel.run, conn)
                self.set(channels)
                await until.wait()
                tg.cancel_scope.cancel()
        finally:
            self.set(None)


@contextlib.asynccontextmanager
async def own_connection_publisher(
    parameters: Sequence[str | ConnectionParameters],
) -> AsyncIterator[Publisher]:
    """A Publisher with a connection of its own (used when the App is not running),
    to the first of ``parameters`` (the App's URLs) that accepts a connection.

    Raises:
        AMQPError: no URL accepted a connection (the last one's error).
    """
    async with contextlib.AsyncExitStack() as stack:
        error: AMQPError | None = None
        for params in parameters:
            try:
                conn = await stack.enter_async_context(connect(params))
            except AMQPError as exc:
                error = exc
                continue
            break
        else:
            assert error is not None, "at least one URL is needed"
            raise error
        channel = PublishChannel()
        async with anyio.create_task_group() as tg:
            await tg.start(channel.run, conn)
            try:
                yield Publisher(channel)
            finally:
                tg.cancel_scope.cancel()
